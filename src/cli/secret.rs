//! `tfmirror secret`: key files for a set of replicas.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub(super) struct SecretArgs {
    #[command(subcommand)]
    action: SecretAction,
}

#[derive(Subcommand, Debug)]
enum SecretAction {
    /// Print a new key file (two random keys) on stdout; a file it is redirected to is made
    /// mode 0600: `tfmirror secret generate > FILE`.
    Generate,
    /// Print OLD's successor: the same identity key (grants stay valid), a new token key.
    /// Serve with it as `secret_file` and OLD as `secret_previous_file` for one token_ttl.
    Rotate {
        #[arg(value_name = "OLD")]
        old: PathBuf,
    },
}

pub(super) fn secret(args: SecretArgs) -> ExitCode {
    use crate::secret::Secret;
    use std::io::Write;
    let made = match args.action {
        SecretAction::Generate => Secret::generate(),
        SecretAction::Rotate { old } => Secret::read_file(&old).and_then(|s| s.rotated()),
    };
    let secret = match made {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            return ExitCode::from(2);
        }
    };
    let out = std::io::stdout();
    // A file the shell created for the redirect has the umask's mode (often 0644), which
    // `secret_file` refuses: close it to others before the key lands in it.
    if let Ok(st) = nix::sys::stat::fstat(&out) {
        use nix::sys::stat::SFlag;
        let regular = st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits();
        if regular {
            if let Err(e) =
                nix::sys::stat::fchmod(&out, nix::sys::stat::Mode::from_bits_truncate(0o600))
            {
                eprintln!("tfmirror: cannot make the output file private: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut out = out.lock();
    match out
        .write_all(secret.to_file_text().as_bytes())
        .and_then(|()| out.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tfmirror: {e}");
            ExitCode::FAILURE
        }
    }
}
