//! Two users, one vault: `vaultfs vault share` and real mounts of both on one
//! `vaultfs serve`. Needs /dev/fuse and root (as in CI).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::mount::TestMount;

/// Retries `f` until it returns `Some` (other clients' changes show at the
/// next listing, within about two seconds), failing after 15 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fingerprint_in(whoami: &str) -> String {
    let line = whoami.lines().find(|l| l.starts_with("fingerprint:")).expect("whoami shows a fingerprint");
    line.trim_start_matches("fingerprint:").trim().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_vault_shared_read_only_then_writable_through_two_real_mounts() {
    let m = TestMount::start();
    std::fs::create_dir(m.path("Family/r")).unwrap();
    std::fs::write(m.path("Family/r/a.txt"), "from alice").unwrap();
    let bob = m.other_user("bob");
    let fp = bob.fingerprint();
    assert_eq!(fp.len(), 29, "{fp}");

    // Without a terminal to confirm on, and without --fingerprint: refused.
    let out = m.run(&["vault", "share", "Family", "bob", "--rights", "read"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--fingerprint"), "{}", stderr(&out));
    // A fingerprint that is not the key the server offers: refused.
    let wrong = format!("{}0000", &fp[..25]);
    let wrong = if wrong == fp { format!("{}1111", &fp[..25]) } else { wrong };
    let out = m.run(&["vault", "share", "Family", "bob", "--rights", "read", "--fingerprint", &wrong]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nothing was shared"), "{}", stderr(&out));
    // Unknown users and vaults: clear errors.
    let out = m.run(&["vault", "share", "Family", "nobody", "--rights", "read", "--fingerprint", &fp]);
    assert!(stderr(&out).contains("no key for \"nobody\""), "{}", stderr(&out));
    let out = m.run(&["vault", "share", "Nope", "bob", "--rights", "read", "--fingerprint", &fp]);
    assert!(stderr(&out).contains("no vault named \"Nope\""), "{}", stderr(&out));
    assert!(!m.ok(&["vault", "members", "Family"]).contains("bob"), "nothing was shared");

    m.ok(&["vault", "share", "Family", "bob", "--rights", "read", "--fingerprint", &fp]);
    // Bob has not confirmed alice's key: the share waits, and says how.
    let alice_fp = fingerprint_in(&m.ok(&["whoami"]));
    let listed = bob.ok(&["vault", "list"]);
    assert!(!listed.contains("Family"), "{listed}");
    assert!(listed.contains(&format!("vaultfs trust alice --fingerprint {alice_fp}")), "{listed}");
    let out = bob.run(&["trust", "alice", "--fingerprint", &fp]);
    assert!(stderr(&out).contains("not the"), "bob's own fingerprint is not alice's: {}", stderr(&out));
    let trusted = bob.ok(&["trust", "alice", "--fingerprint", &alice_fp]);
    assert!(trusted.contains("shared by alice: Family"), "{trusted}");
    let listed = bob.ok(&["vault", "list"]);
    assert!(listed.contains("Family\tread") && listed.contains("shared by alice"), "{listed}");

    // Bob's mount reads alice's file; the vault is read-only there.
    let bm = bob.mount();
    assert_eq!(std::fs::read_to_string(bm.path("Family/r/a.txt")).unwrap(), "from alice");
    let refused = std::fs::write(bm.path("Family/r/b.txt"), "from bob").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    let refused = std::fs::create_dir(bm.path("Family/s")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(bm.path("Family/r/a.txt")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o222, 0, "no write bits in a read-only vault: {mode:o}");

    // Write rights (bob's key is pinned now: no fingerprint needed). Bob's
    // running mount sees them at its next listing.
    m.ok(&["vault", "share", "Family", "bob", "--rights", "write"]);
    eventually("bob's mount to take write rights", || {
        std::fs::write(bm.path("Family/r/b.txt"), "from bob").ok()
    });
    // (Pushed by the change feed, the file may show as created, empty, a
    // moment before its content is stored.)
    let seen = eventually("alice's mount to show bob's file", || {
        std::fs::read_to_string(m.path("Family/r/b.txt")).ok().filter(|s| !s.is_empty())
    });
    assert_eq!(seen, "from bob");
    // Both edit one file in turn.
    std::fs::write(m.path("Family/r/a.txt"), "alice, second").unwrap();
    eventually("bob to see alice's edit", || {
        (std::fs::read_to_string(bm.path("Family/r/a.txt")).ok()? == "alice, second").then_some(())
    });
    // Both edit it at once: the first close wins, the second one's bytes are
    // kept beside it as a conflict copy.
    {
        use std::io::Write;
        let open =
            |p: std::path::PathBuf| std::fs::OpenOptions::new().write(true).truncate(true).open(p).unwrap();
        let (mut fa, mut fb) = (open(m.path("Family/r/a.txt")), open(bm.path("Family/r/a.txt")));
        fa.write_all(b"alice, at once").unwrap();
        fb.write_all(b"bob, at once").unwrap();
        drop(fa);
        drop(fb);
    }
    let copy = eventually("alice's mount to show bob's conflict copy", || {
        std::fs::read_dir(m.path("Family/r"))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.starts_with("a (conflict ") && n.ends_with(").txt"))
            // Shown by the change feed possibly before its content is stored.
            .filter(|n| std::fs::metadata(m.path(&format!("Family/r/{n}"))).is_ok_and(|s| s.len() > 0))
    });
    assert_eq!(std::fs::read_to_string(m.path("Family/r/a.txt")).unwrap(), "alice, at once");
    assert_eq!(std::fs::read_to_string(m.path(&format!("Family/r/{copy}"))).unwrap(), "bob, at once");

    let members = m.ok(&["vault", "members", "Family"]);
    assert!(members.contains(&format!("bob\twrite\t{fp}\tpinned here")), "{members}");
    assert!(members.contains("alice\tadmin"), "{members}");
    // A writer cannot share on.
    let out = bob.run(&["vault", "share", "Family", "alice", "--rights", "read", "--fingerprint", &fp]);
    assert!(stderr(&out).contains("sharing needs admin"), "{}", stderr(&out));

    // Removing bob rotates the key: his mount loses the vault, and what
    // alice's running mount writes next (once it read the changed wallet) is
    // under the new key, while the files before stay under the old one.
    let out = m.ok(&["vault", "unshare", "Family", "bob"]);
    assert!(out.contains("removed bob") && out.contains("epoch 1"), "{out}");
    assert!(out.contains("3 of 3 file(s) are still under older keys"), "{out}");
    eventually("bob's mount to lose the vault", || (!bm.path("Family").exists()).then_some(()));
    assert!(!bob.ok(&["vault", "list"]).contains("Family"));
    std::thread::sleep(Duration::from_millis(2200));
    let _ = std::fs::read_dir(m.path("")).unwrap().count(); // the next listing reads the wallet again
    std::fs::write(m.path("Family/r/c.txt"), "after bob left").unwrap();
    let members = m.ok(&["vault", "members", "Family"]);
    assert!(members.contains("files under older keys: 3 of 4"), "{members}");
    assert!(!members.contains("bob"), "{members}");
    // Rekeying encrypts the older files again; the mount reads them as before.
    let out = m.ok(&["vault", "rekey", "Family"]);
    assert!(
        out.contains("3 file(s) encrypted again") && out.contains("files under older keys: 0 of 4"),
        "{out}"
    );
    eventually("alice's mount to read the rekeyed file", || {
        (std::fs::read_to_string(m.path("Family/r/a.txt")).ok()? == "alice, at once").then_some(())
    });
    drop(bm);
    assert!(Path::new(&m.path("Family/r/b.txt")).exists());
    // Alice stops trusting bob's key altogether.
    let out = m.ok(&["trust", "bob", "--remove"]);
    assert!(out.contains("no longer confirmed"), "{out}");
    let out = m.run(&["trust", "bob", "--remove"]);
    assert!(stderr(&out).contains("nothing to remove"), "{}", stderr(&out));
}
