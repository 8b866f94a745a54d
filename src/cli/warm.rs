//! `tfmirror warm` and `tfmirror sync`: fill a cache before an outage, for a token.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::{client_setup, runtime, Common, Credential, Progress};
use crate::config::Config;

#[derive(Args, Debug)]
pub(super) struct WarmArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    credential: Credential,
    /// Read the registry module blocks for the upstream's host from the `.tf` files in DIR.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// The registry host named in module sources, for --from. [default: the upstream's host]
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// namespace/name/system, optionally @ a Terraform version constraint ("@~> 1.2").
    #[arg(value_name = "MODULE[@CONSTRAINT]")]
    modules: Vec<String>,
    /// A provider to warm: HOST/NAMESPACE/TYPE, optionally @ a constraint
    /// ("registry.terraform.io/hashicorp/aws@~> 5.0"); the newest matching version, as
    /// `terraform init` selects. Repeatable.
    #[arg(long = "provider", value_name = "PROVIDER[@CONSTRAINT]")]
    providers: Vec<String>,
    /// Warm every provider a dependency lock file (`.terraform.lock.hcl`) pins. Repeatable.
    #[arg(long = "lock-file", value_name = "FILE")]
    lock_files: Vec<PathBuf>,
    /// Platforms whose provider packages to cache (os_arch). Repeatable.
    #[arg(
        long = "platform",
        value_name = "OS_ARCH",
        default_value = "linux_amd64"
    )]
    platforms: Vec<String>,
}

#[derive(Args, Debug)]
pub(super) struct SyncArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    credential: Credential,
    /// The group: its full path or numeric id.
    #[arg(long, value_name = "GROUP")]
    group: String,
}

pub(super) fn warm(args: WarmArgs) -> ExitCode {
    let (config, cred) = match client_setup(&args.common, &args.credential) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut wants = Vec::new();
    for m in &args.modules {
        match crate::sync::parse_want(m) {
            Ok(w) => wants.push(w),
            Err(e) => {
                eprintln!("tfmirror: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(dir) = &args.from {
        let host = args
            .host
            .clone()
            .unwrap_or_else(|| config.upstream.host_str().unwrap_or_default().to_string());
        match crate::sync::wants_from_dir(dir, &host) {
            Ok(w) => wants.extend(w),
            Err(e) => {
                eprintln!("tfmirror: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let (provider_wants, platforms) = match provider_args(&args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    if wants.is_empty() && provider_wants.is_empty() {
        eprintln!(
            "tfmirror: nothing to warm: name modules or --provider, --from a directory with module blocks, or --lock-file"
        );
        return ExitCode::from(2);
    }
    let modules = if wants.is_empty() {
        ExitCode::SUCCESS
    } else {
        run_warm(&config, cred, wants)
    };
    if provider_wants.is_empty() {
        return modules;
    }
    let providers = warm_providers(&config, provider_wants, &platforms);
    if modules == ExitCode::SUCCESS {
        providers
    } else {
        modules
    }
}

/// `--provider`, `--lock-file` and `--platform`, read and checked.
type ProviderArgs = (
    Vec<crate::providers::warm::ProviderWant>,
    Vec<crate::routes::provider::Platform>,
);

fn provider_args(args: &WarmArgs) -> Result<ProviderArgs, String> {
    let wants = crate::providers::warm::wants_from_args(&args.providers, &args.lock_files)?;
    let platforms = args
        .platforms
        .iter()
        .map(|p| {
            crate::routes::provider::Platform::parse(p)
                .ok_or_else(|| format!("--platform {p}: expected OS_ARCH (linux_amd64)"))
        })
        .collect::<Result<_, _>>()?;
    Ok((wants, platforms))
}

fn warm_providers(
    config: &Config,
    wants: Vec<crate::providers::warm::ProviderWant>,
    platforms: &[crate::routes::provider::Platform],
) -> ExitCode {
    let parts = match open_parts(config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    warm_each("providers", &wants, |w| {
        let parts = &parts;
        async move {
            let v = parts.providers.warm(w, platforms).await?;
            Ok(format!("{}: cached {v}", w.provider))
        }
    })
}

/// The server's parts on `config`'s cache (exit 2 with the reason when they cannot open).
fn open_parts(config: &Config) -> Result<crate::server::Parts, ExitCode> {
    crate::server::open(config).map_err(|e| {
        eprintln!("tfmirror: {e}");
        ExitCode::from(2)
    })
}

/// Warm each of `wants` in turn with `one`, a progress line each (what was cached, or why
/// not); a failure if any could not be warmed.
fn warm_each<'a, W, F, Fut>(what: &str, wants: &'a [W], one: F) -> ExitCode
where
    F: Fn(&'a W) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let progress = Progress::new(wants.len());
    let failures = runtime().block_on(async {
        let mut failures = 0;
        for w in wants {
            let line = one(w).await.unwrap_or_else(|e| {
                failures += 1;
                e
            });
            progress.line(line);
        }
        failures
    });
    progress.finish();
    if failures > 0 {
        eprintln!(
            "tfmirror: {failures} of {} {what} could not be warmed",
            wants.len()
        );
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub(super) fn sync(args: SyncArgs) -> ExitCode {
    let (config, cred) = match client_setup(&args.common, &args.credential) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let parts = match open_parts(&config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let wants = runtime().block_on(crate::sync::group_modules(
        &parts.upstream,
        cred.as_ref(),
        &args.group,
    ));
    match wants {
        Ok(w) if w.is_empty() => {
            eprintln!("group {}: no Terraform modules", args.group);
            ExitCode::SUCCESS
        }
        Ok(w) => run_warm(&config, cred, w),
        Err(e) => {
            eprintln!("tfmirror: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_warm(
    config: &Config,
    cred: Option<http::HeaderValue>,
    wants: Vec<crate::sync::Want>,
) -> ExitCode {
    let parts = match open_parts(config) {
        Ok(p) => p,
        Err(code) => return code,
    };
    warm_each("modules", &wants, |w| {
        let (parts, cred) = (&parts, cred.clone());
        async move {
            let v = parts
                .registry
                .warm_module(cred, &w.module, &w.constraint)
                .await?;
            if v.is_empty() {
                return Err(format!("{} {}: no version matches", w.module, w.written));
            }
            Ok(format!("{}: cached {}", w.module, v.join(", ")))
        }
    })
}
