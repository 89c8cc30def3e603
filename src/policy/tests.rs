use super::*;

fn parse(text: &str) -> Result<PolicyFile, String> {
    PolicyFile::parse(Path::new("policy.toml"), text).map_err(|e| e.to_string())
}

const EVERY_KEY: &str = r#"
[mount]
allowed_mountpoints = ["/mnt", "~/vaults"]
allow_other = true
default_permissions = true
uid = 1000
gid = 1001
umask = "027"
cache_budget = "256 MiB"

[defaults]
read_only = false
allow_delete = true
oversize = "pass-through"
e2e_limit = "20 MB"
upload_limit = 100000000

[defaults.images]
reduce = true
max_edge = 2000
jpeg_quality = 80
formats = ["jpeg", "png", "webp"]

[vaults."Family Photos"]
read_only = true
allow_delete = false
oversize = "refuse"
e2e_limit = "1 MiB"
upload_limit = "2 MiB"
images = { reduce = false, max_edge = 1024, jpeg_quality = 70, formats = ["png"] }
"#;

#[test]
fn every_key_parses() {
    let p = parse(EVERY_KEY).unwrap();
    assert_eq!(p.mount.allowed_mountpoints, Some(vec![PathBuf::from("/mnt"), PathBuf::from("~/vaults")]));
    assert_eq!(p.mount.allow_other, Some(true));
    assert_eq!(p.mount.default_permissions, Some(true));
    assert_eq!((p.mount.uid, p.mount.gid), (Some(1000), Some(1001)));
    assert_eq!(p.mount.umask, Some(Umask(0o027)));
    assert_eq!(p.mount.cache_budget, Some(Size(256 << 20)));
    assert_eq!(p.defaults.oversize, Some(Oversize::PassThrough));
    assert_eq!(p.defaults.e2e_limit, Some(Size(20_000_000)));
    assert_eq!(p.defaults.upload_limit, Some(Size(100_000_000)));
    assert_eq!(p.defaults.images.max_edge, Some(2000));
    assert_eq!(p.defaults.images.formats, Some(ImageFormat::ALL.to_vec()));
    let fam = &p.vaults["Family Photos"];
    assert_eq!(
        (fam.read_only, fam.allow_delete, fam.oversize),
        (Some(true), Some(false), Some(Oversize::Refuse))
    );
    assert_eq!(fam.images.jpeg_quality, Some(70));
    assert_eq!(fam.images.formats, Some(vec![ImageFormat::Png]));
}

#[test]
fn the_shipped_example_sets_every_key_and_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let p = PolicyFile::parse(&path, &text).unwrap();
    // Every key of the structs appears (uncommented) somewhere in the example.
    for key in [
        "allowed_mountpoints",
        "allow_other",
        "default_permissions",
        "uid",
        "gid",
        "umask",
        "cache_budget",
        "read_only",
        "allow_delete",
        "oversize",
        "e2e_limit",
        "upload_limit",
        "reduce",
        "max_edge",
        "jpeg_quality",
        "formats",
    ] {
        assert!(text.lines().any(|l| l.trim_start().starts_with(key)), "example lacks {key}");
    }
    assert!(!p.vaults.is_empty());
}

#[test]
fn an_empty_or_missing_file_is_an_empty_policy() {
    assert_eq!(parse("").unwrap(), PolicyFile::default());
    let missing = PolicyFile::load(Path::new("/nonexistent/policy.toml"), true).unwrap();
    assert_eq!(missing, PolicyFile::default());
}

/// Each bad file, and words its error must contain: the file, the line, the key and the problem.
#[test]
fn errors_name_file_line_key_and_problem() {
    let cases: &[(&str, &[&str])] = &[
        ("read_only = true", &["line 1", "read_only", "unknown field"]),
        ("[mount]\nalow_other = true", &["line 2", "mount.alow_other", "unknown field"]),
        ("[defaults]\nread_only = \"yes\"", &["line 2", "defaults.read_only", "invalid type"]),
        ("[defaults]\noversize = \"maybe\"", &["line 2", "defaults.oversize", "pass-through"]),
        ("[defaults]\ne2e_limit = \"30 XB\"", &["line 2", "defaults.e2e_limit", "unit"]),
        ("[defaults]\nupload_limit = true", &["line 2", "defaults.upload_limit", "expected a size"]),
        ("[mount]\numask = \"999\"", &["line 2", "mount.umask", "octal"]),
        ("[mount]\numask = 22", &["line 2", "mount.umask", "octal"]),
        ("[mount]\nuid = -1", &["line 2", "mount.uid"]),
        ("[defaults.images]\nformats = [\"gif\"]", &["line 2", "defaults.images.formats", "jpeg"]),
        ("[defaults.images]\njpeg_quality = 0", &["line 2", "jpeg_quality", "between 1 and 100"]),
        ("[defaults.images]\njpeg_quality = 300", &["line 2", "jpeg_quality"]),
        ("[defaults.images]\nmax_edge = 3", &["line 2", "max_edge", "at least 16"]),
        ("[defaults.images]\nshrink = true", &["line 2", "shrink", "unknown field"]),
        (
            "[vaults.X]\ne2e_limit = 10\nupload_limit = 5",
            &["line 2", "vaults.\"X\".e2e_limit", "upload_limit"],
        ),
        ("[vaults.X]\nreadonly = true", &["line 2", "vaults.X.readonly", "unknown field"]),
        ("[mount]\nallowed_mountpoints = [\"vaults\"]", &["line 2", "allowed_mountpoints", "absolute"]),
        ("[mount]\ncache_budget = 100", &["line 2", "cache_budget", "at least 1 MiB"]),
        ("[mount\n", &["line 1"]),
    ];
    for (text, words) in cases {
        let e = parse(text).expect_err(text);
        assert!(e.starts_with("policy.toml: "), "{text}: {e}");
        for w in *words {
            assert!(e.contains(w), "{text:?}: error {e:?} lacks {w:?}");
        }
    }
}

#[test]
fn a_system_policy_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[defaults]\nread_only = true\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = PolicyFile::load(&path, true).unwrap_err().to_string();
    assert!(e.contains("writable only by root"), "{e}");
    // The same file as a user config is fine; a user can only tighten with it.
    assert!(PolicyFile::load(&path, false).is_ok());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Root owns files this test creates only when it runs as root.
    // SAFETY: getuid only reads the process's user id.
    #[allow(unsafe_code)]
    let root = unsafe { libc::getuid() } == 0;
    assert_eq!(PolicyFile::load(&path, true).is_ok(), root);
    // Unreadable (a directory): refused, not treated as empty.
    assert!(PolicyFile::load(dir.path(), true).unwrap_err().to_string().contains("cannot read"));
}

fn policy(admin: &str, user: &str) -> Policy {
    Policy { admin: parse(admin).unwrap(), user: parse(user).unwrap() }
}

const SERVER: Limits = Limits { upload_limit: 300_000_000, e2e_limit: 30_000_000, image_max_edge: 2560 };

#[test]
fn defaults_without_any_file() {
    let v = Policy::default().vault("Any", &SERVER);
    assert!(!v.read_only && v.allow_delete);
    assert_eq!(v.oversize, Oversize::PassThrough);
    assert_eq!((v.e2e_limit, v.upload_limit), (30_000_000, 300_000_000));
    assert_eq!(
        v.images,
        ImagePolicy { reduce: false, max_edge: 2560, jpeg_quality: 85, formats: ImageFormat::ALL.to_vec() }
    );
    let m = Policy::default().mount();
    assert_eq!(
        (m.allow_other, m.default_permissions, m.umask, m.cache_budget),
        (false, false, 0o022, 512 << 20)
    );
}

#[test]
fn the_stricter_value_wins_where_both_speak() {
    let admin = "[defaults]\nread_only = false\nallow_delete = true\noversize = \"pass-through\"\ne2e_limit = \"10 MB\"\n\
                 [defaults.images]\nreduce = true\nmax_edge = 2000\njpeg_quality = 90\nformats = [\"jpeg\"]\n\
                 [mount]\nallow_other = true\ndefault_permissions = false\numask = \"002\"\ncache_budget = \"1 GiB\"\nuid = 5";
    let user = "[defaults]\nread_only = true\nallow_delete = false\noversize = \"refuse\"\ne2e_limit = \"20 MB\"\n\
                upload_limit = \"50 MB\"\n[defaults.images]\nreduce = false\nmax_edge = 3000\njpeg_quality = 70\n\
                formats = [\"png\"]\n[mount]\nallow_other = false\ndefault_permissions = true\numask = \"020\"\n\
                cache_budget = \"64 MiB\"\nuid = 6";
    let p = policy(admin, user);
    let v = p.vault("V", &SERVER);
    assert!(v.read_only, "the user may tighten");
    assert!(!v.allow_delete);
    assert_eq!(v.oversize, Oversize::Refuse);
    assert_eq!((v.e2e_limit, v.upload_limit), (10_000_000, 50_000_000));
    assert!(v.images.reduce, "the admin's reduction cannot be turned off");
    assert_eq!((v.images.max_edge, v.images.jpeg_quality), (2000, 70));
    assert_eq!(v.images.formats, vec![ImageFormat::Jpeg, ImageFormat::Png]);
    let m = p.mount();
    assert!(!m.allow_other && m.default_permissions);
    assert_eq!((m.umask, m.cache_budget, m.uid), (0o022, 64 << 20, Some(5)));

    // The other way round: the user cannot loosen what the admin said.
    let p = policy(
        "[defaults]\nread_only = true\nallow_delete = false\noversize = \"refuse\"\n[mount]\nallow_other = false",
        "[defaults]\nread_only = false\nallow_delete = true\noversize = \"pass-through\"\n[mount]\nallow_other = true",
    );
    let v = p.vault("V", &SERVER);
    assert!(v.read_only && !v.allow_delete && v.oversize == Oversize::Refuse);
    assert!(!p.mount().allow_other);
    // Where the admin is silent, the user's choice holds.
    let p = policy(
        "",
        "[defaults.images]\nreduce = false\n[mount]\nallow_other = true\ndefault_permissions = false",
    );
    assert!(!p.vault("V", &SERVER).images.reduce);
    assert!(p.mount().allow_other);
    assert!(p.mount().default_permissions, "allow_other always comes with the kernel's permission checks");
}

#[test]
fn a_vaults_own_rules_override_the_files_defaults_and_the_server_bounds_all() {
    let p = policy(
        "[defaults]\nread_only = true\ne2e_limit = \"500 MB\"\n[vaults.Scratch]\nread_only = false\n\
         [vaults.Scratch.images]\nmax_edge = 9000",
        "[vaults.Scratch]\nupload_limit = \"1 MB\"",
    );
    assert!(p.vault("Family", &SERVER).read_only);
    let s = p.vault("Scratch", &SERVER);
    assert!(!s.read_only, "the admin's exception for one vault");
    assert_eq!(s.upload_limit, 1_000_000);
    assert_eq!(s.e2e_limit, 1_000_000, "never above the upload limit");
    assert_eq!(s.images.max_edge, 2560, "the server's figure lowers the edge");
    let family = p.vault("Family", &SERVER).e2e_limit;
    assert_eq!(family, 300_000_000, "the server's e2e limit does not bound it; its upload limit does");
    assert_eq!(p.named_vaults(), vec!["Scratch".to_string()]);
}

#[test]
fn mount_points_must_be_under_every_list_given() {
    let p = policy(
        "[mount]\nallowed_mountpoints = [\"/mnt\", \"~/vaults\"]",
        "[mount]\nallowed_mountpoints = [\"/mnt/a\"]",
    );
    let m = p.mount();
    let home = Path::new("/home/u");
    assert!(m.check_mountpoint(Path::new("/mnt/a/x"), Some(home)).is_ok());
    let e = m.check_mountpoint(Path::new("/mnt/b"), Some(home)).unwrap_err();
    assert!(e.contains("/mnt/b") && e.contains("/mnt/a"), "{e}");
    let only_admin = policy("[mount]\nallowed_mountpoints = [\"/mnt\", \"~/vaults\"]", "").mount();
    assert!(only_admin.check_mountpoint(Path::new("/home/u/vaults/x"), Some(home)).is_ok());
    assert!(only_admin.check_mountpoint(Path::new("/home/u/other"), Some(home)).is_err());
    assert!(Policy::default().mount().check_mountpoint(Path::new("/anywhere"), None).is_ok());
}

#[test]
fn image_formats_come_from_the_name() {
    use std::ffi::OsStr;
    assert_eq!(ImageFormat::from_name(OsStr::new("a.JPG")), Some(ImageFormat::Jpeg));
    assert_eq!(ImageFormat::from_name(OsStr::new("a.jpeg")), Some(ImageFormat::Jpeg));
    assert_eq!(ImageFormat::from_name(OsStr::new("b.png")), Some(ImageFormat::Png));
    assert_eq!(ImageFormat::from_name(OsStr::new("c.webp")), Some(ImageFormat::Webp));
    assert_eq!(ImageFormat::from_name(OsStr::new("d.gif")), None);
    assert_eq!(ImageFormat::from_name(OsStr::new("jpg")), None);
    let v = policy("", "[defaults.images]\nreduce = true\nformats = [\"png\"]").vault("V", &SERVER);
    assert_eq!(v.images.applies_to(OsStr::new("x.png")), Some(ImageFormat::Png));
    assert_eq!(v.images.applies_to(OsStr::new("x.jpg")), None);
}

/// The server is the adversary: whatever limits it states, a file the policy
/// encrypts is never passed through, and images are never reduced unless a
/// policy asks, nor below the policy's floor.
#[test]
fn server_limits_can_refuse_but_never_weaken() {
    let hostile = Limits { upload_limit: 300_000_000, e2e_limit: 0, image_max_edge: 1 };
    let v = Policy::default().vault("V", &hostile);
    assert_eq!(v.e2e_limit, 30_000_000, "the policy's default, not the server's zero");
    assert!(v.encrypts(35) && v.encrypts(30_000_000) && !v.encrypts(30_000_001));
    let refusal = v.check_size(35).unwrap_err();
    assert!(matches!(refusal, SizeRefusal::ServerE2eLimit { server: 0, policy: 30_000_000 }), "{refusal}");
    assert!(refusal.to_string().contains("refuses rather than send"), "{refusal}");
    assert_eq!(v.check_size(0), Ok(()), "an empty file is stored");
    assert_eq!(v.check_size(40_000_000), Ok(()), "above the policy's limit: passed through, as configured");
    assert!(!v.images.reduce, "the server cannot turn reduction on");

    // End-to-end only: what the policy would pass through is refused instead.
    let mut strict = Policy::default().vault("V", &SERVER);
    strict.e2e_required = true;
    assert_eq!(strict.check_size(30_000_000), Ok(()));
    assert_eq!(strict.check_size(30_000_001), Err(SizeRefusal::E2eRequired(30_000_000)));
    assert_eq!(strict.check_size(300_000_001), Err(SizeRefusal::Upload(300_000_000)));

    // With reduction on, a server's one-pixel edge stops at the floor.
    let on = policy("", "[defaults.images]\nreduce = true");
    assert_eq!(on.vault("V", &hostile).images.max_edge, DEFAULT_MIN_EDGE);
    assert_eq!(on.vault("V", &SERVER).images.max_edge, 2560);
    let own = policy("[defaults.images]\nreduce = true\nmax_edge = 2000\nmin_edge = 1500", "");
    assert_eq!(own.vault("V", &hostile).images.max_edge, 1500);
    let mid = Limits { image_max_edge: 1800, ..SERVER };
    assert_eq!(own.vault("V", &mid).images.max_edge, 1800, "the server may lower it above the floor");
    let low_max = policy("[defaults.images]\nmax_edge = 800", "");
    assert_eq!(
        low_max.vault("V", &hostile).images.max_edge,
        800,
        "a floor never lifts the policy's own edge"
    );
    let bad = parse("[defaults.images]\nmin_edge = 3000\nmax_edge = 2000").unwrap_err().to_string();
    assert!(bad.contains("min_edge") && bad.contains("line 2"), "{bad}");
}
