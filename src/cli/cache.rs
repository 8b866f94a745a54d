//! `tfmirror cache`: inspect and maintain a cache directory; safe while a server uses it.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{load, Common, Progress};
use crate::config::Overrides;

#[derive(Args, Debug)]
pub(super) struct CacheArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    action: CacheAction,
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// List cached tarballs: module, version, size, age.
    Ls,
    /// Recompute every tarball's blake3 hash; exit 1 and list the damaged entries if any.
    Verify,
    /// Remove a module, or one version, with its listings and grants; or a provider
    /// (`provider:HOST/NAMESPACE/TYPE[@VERSION]`) with its checksums and version list.
    Purge {
        #[arg(value_name = "MODULE[@VERSION]")]
        module: String,
    },
    /// Remove orphan blobs and dead temp files; evict past `cache.disk_size`.
    Gc,
}

pub(super) fn cache(args: CacheArgs) -> ExitCode {
    let config = match load(&args.common, Overrides::default()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let admin = match crate::cache::admin::Admin::open(&config.cache_dir) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.action {
        CacheAction::Ls => cache_ls(&admin),
        CacheAction::Verify => cache_verify(&admin),
        CacheAction::Purge { module } => admin.purge(&module).map(|n| {
            println!("purged {module}: {n} records");
            ExitCode::SUCCESS
        }),
        CacheAction::Gc => admin
            .gc(
                config.cache.disk_size.as_u64(),
                config.auth.grant_ttl + config.cache.stale_if_error,
            )
            .map(|(dangling, orphans, evicted)| {
                println!(
                    "removed {orphans} orphan blobs and {dangling} records of evicted blobs \
                         or expired grants, evicted {evicted}"
                );
                ExitCode::SUCCESS
            }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("tfmirror: {e}");
        ExitCode::FAILURE
    })
}

/// `tfmirror cache ls`: every tarball with its blake3, and, for a re-published version, which
/// bytes it had before and when they changed.
fn cache_ls(admin: &crate::cache::admin::Admin) -> std::io::Result<ExitCode> {
    let at = |secs: u64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        )
    };
    println!(
        "{:<60} {:>12} {:>10}  BLAKE3",
        "MODULE@VERSION", "BYTES", "AGE"
    );
    for r in admin.ls()? {
        let age =
            humantime::format_duration(std::time::Duration::from_secs(r.age_secs)).to_string();
        println!("{:<60} {:>12} {:>10}  {}", r.key, r.size, age, r.hash);
        for old in &r.replaced {
            println!(
                "  re-published {}: was {} ({} bytes, fetched {})",
                at(old.replaced_at),
                old.hash,
                old.size,
                at(old.fetched_at)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tfmirror cache verify`: fails when anything is damaged.
fn cache_verify(admin: &crate::cache::admin::Admin) -> std::io::Result<ExitCode> {
    let rows = admin.ls().map(|r| r.len()).unwrap_or(0);
    let progress = Progress::new(rows);
    let found = admin.verify(|row| progress.line(format!("verifying {}", row.key)));
    progress.finish();
    let found = found?;
    for (row, why) in &found.damaged {
        println!("DAMAGED {} ({why})", row.key);
    }
    println!(
        "{} checked, {} listing bodies checked, {} damaged, {} evicted (filled again on the next request)",
        found.checked,
        found.listings,
        found.damaged.len(),
        found.evicted.len()
    );
    Ok(if found.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
