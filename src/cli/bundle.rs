//! `tfmirror bundle keygen | export | import`: the arguments; the work is in [`crate::bundle`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{load, logging, Common};
use crate::bundle;
use crate::config::{Config, LogLevel, Overrides};

#[derive(Args, Debug)]
pub(super) struct BundleArgs {
    #[command(subcommand)]
    action: BundleAction,
}

#[derive(Subcommand, Debug)]
enum BundleAction {
    /// Make a signing key: KEY (armored OpenPGP secret key, Ed25519, no passphrase, mode
    /// 0600) and KEY.pub (its public key, for `import --trust`). Never overwrites.
    Keygen {
        #[arg(long, value_name = "KEY")]
        out: PathBuf,
    },
    /// Write what a selection names in the cache directory (no network) as one signed bundle.
    Export(ExportArgs),
    /// Check a bundle (signature against the trusted keys, then every digest), or a
    /// `terraform providers mirror` directory (--providers-dir: every package against its
    /// hashes), and only then add it to the cache directory; safe while a server uses it.
    /// Exit 1 with one line on any refusal, the cache unchanged.
    Import(ImportArgs),
    /// Who may read imported private modules on a sealed mirror
    /// (`offline.imported_readers: listed`).
    Reader {
        #[command(subcommand)]
        action: ReaderAction,
    },
}

#[derive(Subcommand, Debug)]
enum ReaderAction {
    /// Read one credential (a token) from standard input and add its keyed hash to the
    /// readers file, never the credential itself. A running server sees it within a second.
    Add(ReaderAddArgs),
}

#[derive(Args, Debug)]
struct ReaderAddArgs {
    #[command(flatten)]
    common: Common,
    /// The readers file. [default: `offline.readers_file`]
    #[arg(long, value_name = "FILE")]
    readers_file: Option<PathBuf>,
    /// A note written after the hash, for the operator (who this credential is).
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
}

#[derive(Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    common: Common,
    /// The signing key (`tfmirror bundle keygen`).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
    /// The bundle to write (replaced atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Every module and provider cached, every version and platform.
    #[arg(long, conflicts_with_all = ["modules", "from", "providers", "lock_files"])]
    all: bool,
    /// namespace/name/system, optionally @ a Terraform version constraint ("@~> 1.2"): the
    /// cached versions that match.
    #[arg(value_name = "MODULE[@CONSTRAINT]")]
    modules: Vec<String>,
    /// The registry module blocks for the upstream's host in the `.tf` files in DIR.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// The registry host named in module sources, for --from. [default: the upstream's host]
    #[arg(long, value_name = "HOST", requires = "from")]
    host: Option<String>,
    /// HOST/NAMESPACE/TYPE, optionally @ a constraint: the cached versions that match.
    /// Repeatable.
    #[arg(long = "provider", value_name = "PROVIDER[@CONSTRAINT]")]
    providers: Vec<String>,
    /// Every provider version a dependency lock file pins. Repeatable.
    #[arg(long = "lock-file", value_name = "FILE")]
    lock_files: Vec<PathBuf>,
    /// Only these platforms' provider packages (os_arch). Repeatable. [default: every cached one]
    #[arg(long = "platform", value_name = "OS_ARCH")]
    platforms: Vec<String>,
}

#[derive(Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    common: Common,
    /// A public key (armored) whose signature to accept, besides `bundle.trusted_keys`.
    /// Repeatable.
    #[arg(long, value_name = "KEY.pub", conflicts_with = "providers_dir")]
    trust: Vec<PathBuf>,
    /// The bundle.
    #[arg(
        value_name = "FILE",
        required_unless_present = "providers_dir",
        conflicts_with = "providers_dir"
    )]
    file: Option<PathBuf>,
    /// Instead of a bundle: a directory written by `terraform providers mirror DIR`. Its
    /// packages are checked against the hashes it gives; no key is involved (whoever ran the
    /// command stands for them).
    #[arg(long, value_name = "DIR")]
    providers_dir: Option<PathBuf>,
}

pub(super) fn bundle(args: BundleArgs) -> ExitCode {
    match args.action {
        BundleAction::Keygen { out } => match bundle::sign::keygen(&out) {
            Ok(id) => {
                let public = bundle::sign::public_path(&out);
                println!(
                    "wrote {} (secret, mode 0600) and {} (public); key id {id}",
                    out.display(),
                    public.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(2, &e),
        },
        BundleAction::Export(a) => export(&a),
        BundleAction::Import(a) => import(&a),
        BundleAction::Reader {
            action: ReaderAction::Add(a),
        } => reader_add(&a),
    }
}

fn fail(code: u8, msg: &str) -> ExitCode {
    eprintln!("tfmirror: {msg}");
    ExitCode::from(code)
}

fn setup(common: &Common) -> Result<Config, ExitCode> {
    let config = load(common, Overrides::default())?;
    // Progress and the outcome go to the terminal; only warnings and errors are logged.
    logging::init(
        LogLevel::Warn.min(config.log_level),
        config.log_format,
        false,
    );
    Ok(config)
}

fn export(args: &ExportArgs) -> ExitCode {
    let config = match setup(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let selection = match selection(args, &config) {
        Ok(s) => s,
        Err(e) => return fail(2, &e),
    };
    let key = match bundle::sign::read_secret(&args.key) {
        Ok(k) => k,
        Err(e) => return fail(2, &e),
    };
    let dir = match crate::cache::dir::CacheDir::open_existing(&config.cache_dir) {
        Ok(d) => d,
        Err(e) => return fail(2, &e.to_string()),
    };
    let plan = match bundle::export::plan(dir, &selection) {
        Ok(p) => p,
        Err(e) => return fail(1, &e),
    };
    for line in &plan.skipped {
        eprintln!("skipped {line}");
    }
    let bar = progress(2 * plan.len());
    let written = bundle::write::write(&plan, &key, &args.out, &mut |path: &str| {
        if let Some(b) = &bar {
            b.set_message(path.to_string());
            b.inc(1);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match written {
        Ok(size) => {
            let what: Vec<String> = bundle::export::summary(&plan)
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            let size = bytesize::ByteSize(size);
            println!(
                "wrote {} ({size}): {} items, {}",
                args.out.display(),
                plan.len(),
                what.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e),
    }
}

/// A bar on a terminal only: in a pipe or a log, the closing line says it all.
fn progress(len: usize) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(len as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}")
                .expect("static template"),
        );
        bar
    })
}

/// The selection as `warm` reads it.
fn selection(args: &ExportArgs, config: &Config) -> Result<bundle::export::Selection, String> {
    let mut s = bundle::export::Selection {
        all: args.all,
        ..Default::default()
    };
    let mut wants = Vec::new();
    for m in &args.modules {
        wants.push(crate::sync::parse_want(m)?);
    }
    if let Some(dir) = &args.from {
        let host = args
            .host
            .clone()
            .unwrap_or_else(|| config.upstream.host_str().unwrap_or_default().to_string());
        wants.extend(crate::sync::wants_from_dir(dir, &host)?);
    }
    s.modules = wants
        .into_iter()
        .map(|w| (w.module.to_string(), w.constraint, w.written))
        .collect();
    let providers = crate::providers::warm::wants_from_args(&args.providers, &args.lock_files)?;
    s.providers = providers
        .into_iter()
        .map(|w| (w.provider.to_string(), w.constraint, w.written))
        .collect();
    for p in &args.platforms {
        let platform = crate::routes::provider::Platform::parse(p)
            .ok_or_else(|| format!("--platform {p}: expected OS_ARCH (linux_amd64)"))?;
        s.platforms.push(platform.to_string());
    }
    if !s.all && s.modules.is_empty() && s.providers.is_empty() {
        return Err("nothing to export: name modules or --provider, --from a directory with module blocks, --lock-file, or --all".into());
    }
    Ok(s)
}

fn import(args: &ImportArgs) -> ExitCode {
    let config = match setup(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (what, result) = match (&args.providers_dir, &args.file) {
        (Some(dir), _) => (dir, bundle::mirrordir::import(&config.cache_dir, dir)),
        (None, Some(file)) => {
            let keys = match trusted_keys(args, &config) {
                Ok(k) => k,
                Err(code) => return code,
            };
            (file, bundle::import::import(&config.cache_dir, file, &keys))
        }
        (None, None) => return fail(2, "give a bundle FILE or --providers-dir DIR"),
    };
    match result {
        Ok(done) => {
            let written = match done.written {
                0 => "nothing new: the cache already held all of it".to_string(),
                n => format!("{n} blobs and records written"),
            };
            if args.providers_dir.is_some() {
                println!(
                    "imported {}: {} provider packages ({} providers), checked against the directory's hashes; {written}",
                    what.display(),
                    done.items,
                    done.providers
                );
            } else {
                println!(
                    "imported {}: signed by {}; {} items ({} modules, {} providers); {written}",
                    what.display(),
                    done.signer,
                    done.items,
                    done.modules,
                    done.providers
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) if e.wrote => fail(1, &e.reason),
        Err(e) => fail(1, &format!("bundle refused, cache unchanged: {}", e.reason)),
    }
}

/// The keys a bundle's signature may verify with: `--trust` and `bundle.trusted_keys`.
fn trusted_keys(
    args: &ImportArgs,
    config: &Config,
) -> Result<Vec<pgp::composed::SignedPublicKey>, ExitCode> {
    let files: Vec<PathBuf> = args
        .trust
        .iter()
        .chain(&config.bundle.trusted_keys)
        .cloned()
        .collect();
    if files.is_empty() {
        return Err(fail(
            2,
            "no trusted key: give --trust KEY.pub or set bundle.trusted_keys",
        ));
    }
    bundle::sign::read_trusted(&files).map_err(|e| fail(2, &e))
}

fn reader_add(args: &ReaderAddArgs) -> ExitCode {
    use crate::secret::{readers, Secret};
    let config = match setup(&args.common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(file) = args
        .readers_file
        .clone()
        .or(config.offline.readers_file.clone())
    else {
        return fail(
            2,
            "no readers file: give --readers-file or set offline.readers_file",
        );
    };
    if args.label.as_deref().is_some_and(|l| !readers::label_ok(l)) {
        return fail(
            2,
            "--label must be one printable line of at most 100 characters",
        );
    }
    // The identity key of the mirror that reads the file: the set's `secret_file`, or the
    // instance's own key in its cache directory (made here if the server has not yet run, as
    // its first start would).
    if config.secret_file.is_none() {
        if let Err(e) = std::fs::create_dir_all(&config.cache_dir) {
            return fail(2, &format!("{}: {e}", config.cache_dir.display()));
        }
    }
    let secret = match Secret::load(
        &config.cache_dir,
        config.secret_file.as_deref(),
        config.secret_previous_file.as_deref(),
    ) {
        Ok(s) => s,
        Err(e) => return fail(2, &e),
    };
    let credential = match read_credential() {
        Ok(c) => c,
        Err(e) => return fail(2, &e),
    };
    let hash = secret.reader_hash(credential.as_bytes());
    match readers::add(&file, &hash, args.label.as_deref()) {
        Ok(true) => {
            println!("added a reader to {}", file.display());
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("already a reader in {}; nothing written", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, &e),
    }
}

/// One line from standard input, without echo on a terminal: a credential never goes on the
/// command line (process lists, shell history).
fn read_credential() -> Result<String, String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let saved = terminal.then(|| tcgetattr(&stdin).ok()).flatten();
    if let Some(t) = &saved {
        eprint!("credential (not shown): ");
        let mut quiet = t.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &quiet);
    }
    let mut line = String::new();
    let read = stdin.read_line(&mut line);
    if let Some(t) = &saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, t);
        eprintln!();
    }
    read.map_err(|e| format!("reading the credential from standard input: {e}"))?;
    let credential = line.trim();
    if credential.is_empty() {
        return Err("no credential on standard input (give the token, one line)".into());
    }
    Ok(credential.to_string())
}
