//! `Config::load`'s precedence, validation and error wording.

use super::*;
use std::io::Write;

/// An environment provider that reads nothing, so tests do not depend on the process env.
fn no_env() -> Env {
    Env::prefixed("TFMIRROR_TEST_NEVER_SET_")
}

fn load(yaml: &str, o: &Overrides) -> Result<Config, ConfigError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(yaml.as_bytes()).unwrap();
    Config::load_with_env(Some(f.path()), o, no_env())
}

#[test]
fn defaults_are_sane() {
    let c = Config::load_with_env(None, &Overrides::default(), no_env()).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.upstream.as_str(), "https://gitlab.com/");
    assert!(c.timeouts.connect <= Duration::from_secs(2));
}

#[test]
fn flags_override_file() {
    let o = Overrides {
        listen: Some("127.0.0.1:9999".into()),
        ..Default::default()
    };
    let c = load(
        "listen: 127.0.0.1:7000\nupstream: http://example.com/gitlab\n",
        &o,
    )
    .unwrap();
    assert_eq!(c.listen.port(), 9999);
    assert_eq!(c.upstream.path(), "/gitlab");
}

#[test]
fn unknown_keys_are_named() {
    let e = load("timeouts:\n  conect: 1s\n", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("conect"), "{e}");
    let e = load("listne: 1\n", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("listne"), "{e}");
}

#[test]
fn invalid_values_are_named() {
    let e = load("timeouts:\n  connect: soon\n", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("timeouts.connect"), "{e}");
    let e = load("upstream: ftp://x\n", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("`upstream`"), "{e}");
    let o = Overrides {
        listen: Some("nowhere".into()),
        ..Default::default()
    };
    let e = load("", &o).unwrap_err();
    assert!(e.to_string().contains("listen"), "{e}");
    let e = load("upstream_ca: /nonexistent.pem\n", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("upstream_ca"), "{e}");
}

#[test]
fn providers_section_is_validated_without_echoing_values() {
    let c = load("", &Overrides::default()).unwrap();
    assert_eq!(
        c.providers.upstreams().keys().collect::<Vec<_>>(),
        ["registry.opentofu.org", "registry.terraform.io"]
    );
    assert!(!c.providers.allow_unsigned);
    // A configured map replaces the defaults.
    let c = load(
        "providers:\n  upstreams:\n    example.com: https://mirror.example.com/reg\n",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(c.providers.upstreams().len(), 1);
    let e = load(
        "providers:\n  upstreams:\n    example.com: http://secret-host.internal/\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("providers.upstreams.example.com"), "{e}");
    assert!(!e.contains("secret-host"), "{e}");
    let e = load(
        "providers:\n  upstreams:\n    Example.COM: https://x.example/\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("providers.upstreams"), "{e}");
    let e = load(
        "providers:\n  allowed_hosts: [\"bad host\"]\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("providers.allowed_hosts") && !e.contains("bad host"),
        "{e}"
    );
    let e = load(
        "providers:\n  upstream_ca: /nonexistent.pem\n",
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("providers.upstream_ca") && !e.contains("nonexistent"),
        "{e}"
    );
    let e = load("providers:\n  alow_unsigned: true\n", &Overrides::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("alow_unsigned"), "{e}");
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
fn environment_sits_between_file_and_flags() {
    figment::Jail::expect_with(|jail| {
        jail.create_file("c.yaml", "listen: 127.0.0.1:7000\nlog_level: warn\n")?;
        jail.set_env("TFMIRROR_LISTEN", "127.0.0.1:7001");
        jail.set_env("TFMIRROR_TIMEOUTS__CONNECT", "500ms");
        let c = Config::load(Some(Path::new("c.yaml")), &Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.log_level, LogLevel::Warn);
        assert_eq!(c.log_format, LogFormat::Auto);
        jail.set_env("TFMIRROR_LOG_FORMAT", "text");
        let c = Config::load(Some(Path::new("c.yaml")), &Overrides::default()).unwrap();
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.timeouts.connect, Duration::from_millis(500));
        let o = Overrides {
            listen: Some("127.0.0.1:7002".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::load(Some(Path::new("c.yaml")), &o)
                .unwrap()
                .listen
                .port(),
            7002
        );
        jail.set_env("TFMIRROR_BOGUS", "1");
        let e = Config::load(None, &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        Ok(())
    });
}

/// A secret put in the wrong variable: the error names the key, never the value, whatever
/// kind of error the value causes.
#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
fn errors_name_the_key_never_the_value() {
    const SECRET: &str = "glpat-Sup3rS3cretTok3n";
    for (var, key) in [
        ("TFMIRROR_LOG_LEVEL", "log_level"),   // unknown variant
        ("TFMIRROR_LOG_FORMAT", "log_format"), // unknown variant
        ("TFMIRROR_THREADS", "threads"),       // invalid type
        ("TFMIRROR_LISTEN", "listen"),         // custom message (address)
        ("TFMIRROR_UPSTREAM", "upstream"),     // custom message (URL)
        ("TFMIRROR_TIMEOUTS__CONNECT", "timeouts.connect"), // humantime
        ("TFMIRROR_CACHE__DISK_SIZE", "cache.disk_size"), // bytesize
        ("TFMIRROR_OFFLINE__ENABLED", "offline.enabled"), // invalid type (bool)
        ("TFMIRROR_UPSTREAM_CA", "upstream_ca"), // a path that is no file
        ("TFMIRROR_PROVIDERS__UPSTREAM_CA", "providers.upstream_ca"),
        ("TFMIRROR_TLS_CERT", "tls_key"), // needs its pair
    ] {
        figment::Jail::expect_with(|jail| {
            jail.set_env(var, SECRET);
            let e = Config::load(None, &Overrides::default()).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(key), "{var}: {text}");
            assert!(!text.contains("Sup3r"), "{var} echoed its value: {text}");
            Ok(())
        });
    }
    // A value quoted partially by its parser (a duration's unit) is not echoed either.
    figment::Jail::expect_with(|jail| {
        jail.set_env("TFMIRROR_TIMEOUTS__READ", "5Sup3rs");
        let e = Config::load(None, &Overrides::default()).unwrap_err();
        assert!(!e.to_string().contains("Sup3r"), "{e}");
        Ok(())
    });
}

/// Issue 28: the CI settings, in YAML and in the environment; unknown keys named.
#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
fn ci_settings_load_from_yaml_and_env() {
    let c = Config::load_with_env(None, &Overrides::default(), no_env()).unwrap();
    assert!(c.auth.principal_grants);
    assert_eq!(c.auth.id_token.audience, None);
    assert_eq!(
        c.auth.id_token.issuer_for(&c.upstream),
        "https://gitlab.com"
    );
    let yaml = "upstream: https://gitlab.example.com/\nauth:\n  principal_grants: false\n  \
                id_token:\n    audience: tfmirror\n    require_ref_protected: true\n";
    let c = load(yaml, &Overrides::default()).unwrap();
    assert!(!c.auth.principal_grants);
    assert_eq!(c.auth.id_token.audience.as_deref(), Some("tfmirror"));
    assert!(c.auth.id_token.require_ref_protected);
    assert_eq!(
        c.auth.id_token.issuer_for(&c.upstream),
        "https://gitlab.example.com"
    );
    let e = load(
        "auth:\n  id_token:\n    audiance: x\n",
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("audiance"), "{e}");
    let e = load(
        "auth:\n  id_token:\n    audience: ' '\n",
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("auth.id_token.audience"), "{e}");
    figment::Jail::expect_with(|jail| {
        jail.set_env("TFMIRROR_AUTH__PRINCIPAL_GRANTS", "false");
        jail.set_env("TFMIRROR_AUTH__ID_TOKEN__AUDIENCE", "https://tfmirror.test");
        jail.set_env("TFMIRROR_AUTH__ID_TOKEN__ISSUER", "https://gitlab.test");
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert!(!c.auth.principal_grants);
        assert_eq!(
            c.auth.id_token.audience.as_deref(),
            Some("https://tfmirror.test")
        );
        assert_eq!(
            c.auth.id_token.issuer_for(&c.upstream),
            "https://gitlab.test"
        );
        Ok(())
    });
}

#[test]
fn bundle_section_names_its_keys() {
    let c = load("", &Overrides::default()).unwrap();
    assert!(c.bundle.trusted_keys.is_empty());
    let key = tempfile::NamedTempFile::new().unwrap();
    let yaml = format!("bundle:\n  trusted_keys: [{}]\n", key.path().display());
    let c = load(&yaml, &Overrides::default()).unwrap();
    assert_eq!(c.bundle.trusted_keys, vec![key.path().to_path_buf()]);
    let e = load("bundle:\n  trusted_key: [a]\n", &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("trusted_key"), "{e}");
    let e = load(
        "bundle:\n  trusted_keys: [/nonexistent.pub]\n",
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bundle.trusted_keys"), "{e}");
}

#[test]
fn imported_readers_name_their_keys_and_never_echo_a_value() {
    let c = load("", &Overrides::default()).unwrap();
    assert_eq!(c.offline.imported_readers, ImportedReaders::None);
    let e = load(
        "offline:\n  imported_readers: listed\n",
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("offline.readers_file"), "{e}");
    let e = load(
        "offline:\n  imported_readers: glpat-secret\n",
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("offline.imported_readers"), "{e}");
    assert!(!e.to_string().contains("glpat"), "{e}");
    let file = tempfile::NamedTempFile::new().unwrap();
    let yaml = |setting: &str| {
        format!(
            "offline:\n  imported_readers: {setting}\n  readers_file: {}\n",
            file.path().display()
        )
    };
    std::fs::write(file.path(), format!("{}\n", "ab".repeat(32))).unwrap();
    let c = load(&yaml("listed"), &Overrides::default()).unwrap();
    assert_eq!(c.offline.imported_readers, ImportedReaders::Listed);
    // A file that is read by no one is a mistake worth naming.
    let e = load(&yaml("anyone"), &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("offline.readers_file"), "{e}");
    std::fs::write(file.path(), "glpat-secret-token\n").unwrap();
    let e = load(&yaml("listed"), &Overrides::default()).unwrap_err();
    assert!(e.to_string().contains("offline.readers_file"), "{e}");
    assert!(!e.to_string().contains("glpat"), "{e}");
}
