//! The service on a real SQLite file and local blobs, without HTTP: what
//! only shows below the API (where small writes run).

use std::time::Duration;

use super::*;
use crate::protocol::{KdfWire, Limits, NewRecord, NewVault};
use crate::server::blob::LocalBlobStore;
use crate::server::meta::Meta;

struct Setup {
    service: Arc<Service<LocalBlobStore>>,
    caller: Caller,
    vault: VaultId,
    record: RecordId,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let meta: MetaDb = Meta::open(&dir.path().join("meta.db")).unwrap().into();
    let kdf = KdfWire { m_cost_kib: 256, t_cost: 1, p_cost: 1 };
    let (made, _) = meta.run(|m| m.create_user("u", Limits::DEFAULT, b"salt", kdf, b"hash"));
    made.unwrap();
    let (user, _) = meta.run(|m| m.user_by_name("u"));
    let caller = Caller { user: user.unwrap().unwrap() };
    let blobs = LocalBlobStore::open(&dir.path().join("blobs")).unwrap();
    let config = ServiceConfig { session_ttl_secs: 60, login_kdf: kdf, lock_ttl: Duration::from_secs(30) };
    let service = Arc::new(Service::new(meta, blobs, config).unwrap());
    let vault = VaultId::random().unwrap();
    let name = Sealed(b"v".to_vec());
    service
        .create_vault(&caller, NewVault { id: vault, name, e2e_required: false, wrapped_key: None })
        .await
        .unwrap();
    let record = RecordId::random().unwrap();
    let r = NewRecord { id: record, parent: None, title: Sealed(b"r".to_vec()), fields: Sealed::default() };
    service.create_record(&caller, vault, r).await.unwrap();
    Setup { service, caller, vault, record, dir }
}

fn upload(content: &[u8]) -> Upload {
    let piece = Bytes::copy_from_slice(content);
    Upload {
        expected_version: 0,
        e2e: true,
        mtime_ms: Some(1),
        declared_len: Some(content.len() as u64),
        conflict_copy: None,
        meta: None,
        body: Box::pin(futures_util::stream::iter([Ok(piece)])),
    }
}

fn new_file() -> NewFile {
    NewFile {
        id: FileId::random().unwrap(),
        name: Sealed(b"n".to_vec()),
        e2e: true,
        mtime_ms: None,
        meta: Sealed::default(),
    }
}

async fn read_back(s: &Setup, id: FileId) -> Vec<u8> {
    let d = s.service.download(&s.caller, id, None).await.unwrap();
    crate::remote::collect(d.stream).await.unwrap()
}

/// Fixes the pace: quick (small writes in place) or slow (on the pool).
fn pace(s: &Setup, quick: bool) {
    s.service.pace.pin(quick);
    assert_eq!(s.service.pace.quick(), quick);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_do_the_same_in_place_and_on_the_pool() {
    let s = setup().await;
    for quick in [true, false, true] {
        pace(&s, quick);
        let (in_place, changes) = (s.service.pace.in_place_count(), *s.service.written.borrow());
        let f = new_file();
        let content = format!("in place: {quick}").into_bytes();
        let done =
            s.service.create_with_content(&s.caller, s.record, None, f.clone(), upload(&content)).await;
        assert_eq!(done.unwrap().size, content.len() as u64);
        assert_eq!(read_back(&s, f.id).await, content);
        let r = NewRecord {
            id: RecordId::random().unwrap(),
            parent: Some(s.record),
            title: Sealed(b"t".to_vec()),
            fields: Sealed::default(),
        };
        s.service.create_record(&s.caller, s.vault, r.clone()).await.unwrap();
        assert_eq!(s.service.record(&s.caller, r.id).await.unwrap().parent, Some(s.record));
        // A write refused by the database, in place or not, is refused
        // the same way.
        let again = s.service.create_record(&s.caller, s.vault, r).await;
        assert!(matches!(again, Err(ServiceError::Exists(_))), "{again:?}");
        let ran_here = s.service.pace.in_place_count() - in_place;
        assert_eq!(ran_here, if quick { 3 } else { 0 }, "writes in place (quick: {quick})");
        // Waits for changes were woken by both writes, wherever they ran.
        assert!(*s.service.written.borrow() >= changes + 2, "waits for changes not woken (quick: {quick})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_small_bodies_are_stored_on_the_pool() {
    let s = setup().await;
    pace(&s, true);
    let before = s.service.pace.in_place_count();
    let big = vec![7u8; pace::IN_PLACE_MAX as usize + 1];
    let f = new_file();
    s.service.create_with_content(&s.caller, s.record, None, f.clone(), upload(&big)).await.unwrap();
    assert_eq!(read_back(&s, f.id).await, big);
    assert_eq!(s.service.pace.in_place_count(), before, "a body over the in-place bound was stored in place");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_cannot_be_written_in_place_commits_nothing() {
    let s = setup().await;
    pace(&s, true);
    // The store's temporary directory is a file now: creating the blob fails.
    let tmp = s.dir.path().join("blobs/tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::write(&tmp, b"").unwrap();
    let f = new_file();
    let done = s.service.create_with_content(&s.caller, s.record, None, f.clone(), upload(b"lost?")).await;
    assert!(done.is_err(), "{done:?}");
    assert!(matches!(s.service.file(&s.caller, f.id).await, Err(ServiceError::NotFound(_))));
}

/// Holds the database from another thread until the returned sender says
/// go (or a watchdog does, after 5 s).
fn hold_database(s: &Setup) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let meta = s.service.meta.clone();
    let holder = std::thread::spawn(move || {
        let (done, _) = meta.run(|_| {
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            Ok::<_, MetaError>(())
        });
        done.unwrap();
    });
    let watchdog = go_tx.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        let _ = watchdog.send(());
    });
    held_rx.recv().unwrap();
    (go_tx, holder)
}

/// On one thread, so a small write that blocked it waiting for the
/// database would stall everything (until the watchdog, and that shows).
#[tokio::test(flavor = "current_thread")]
async fn a_write_waits_on_the_pool_while_another_holds_the_database() {
    let s = setup().await;
    pace(&s, true);
    let (go, holder) = hold_database(&s);
    let (f, record) = (new_file(), s.record);
    let id = f.id;
    let service = Arc::clone(&s.service);
    let caller = s.caller.clone();
    let file = tokio::spawn(async move {
        let commit = move |m: &mut dyn MetaStore, blob, size| {
            m.create_with_content(
                None,
                record,
                &f,
                &Committed { blob, size, e2e: true, mtime_ms: 1, meta: None },
            )
        };
        service.store_and_commit(&caller, upload(b"x").body, Some(1), commit).await
    });
    let child = RecordId::random().unwrap();
    let service = Arc::clone(&s.service);
    let (vault, title) = (s.vault, Sealed(b"t".to_vec()));
    let new = NewRecord { id: child, parent: Some(record), title, fields: Sealed::default() };
    let rec = tokio::spawn(async move { service.db_write(move |m| m.create_record(vault, &new)).await });
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a write waiting for the database blocked the thread"
    );
    assert!(!file.is_finished() && !rec.is_finished(), "a write went past a held database");
    let _ = go.send(());
    holder.join().unwrap();
    file.await.unwrap().unwrap();
    rec.await.unwrap().unwrap();
    assert_eq!(read_back(&s, id).await, b"x");
    assert_eq!(s.service.record(&s.caller, child).await.unwrap().parent, Some(record));
}

/// A record in a second vault of the caller's (who may write in both).
async fn record_elsewhere(s: &Setup) -> RecordId {
    let other = VaultId::random().unwrap();
    let name = Sealed(b"w".to_vec());
    s.service
        .create_vault(&s.caller, NewVault { id: other, name, e2e_required: false, wrapped_key: None })
        .await
        .unwrap();
    let id = RecordId::random().unwrap();
    let r = NewRecord { id, parent: None, title: Sealed(b"e".to_vec()), fields: Sealed::default() };
    s.service.create_record(&s.caller, other, r).await.unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_goes_only_under_a_parent_of_its_own_vault() {
    let s = setup().await;
    // A second vault of the same caller, with a record of its own: the
    // caller may write in both, so only the store's check refuses (as it
    // refuses a parent in another user's vault, the HTTP tests' case).
    let elsewhere = record_elsewhere(&s).await;
    for quick in [true, false] {
        pace(&s, quick);
        let mut answers = Vec::new();
        for parent in [elsewhere, RecordId::random().unwrap()] {
            let id = RecordId::random().unwrap();
            let r = NewRecord {
                id,
                parent: Some(parent),
                title: Sealed(b"t".to_vec()),
                fields: Sealed::default(),
            };
            let made = s.service.create_record(&s.caller, s.vault, r).await;
            assert!(matches!(made, Err(ServiceError::NotFound(_))), "{made:?} (quick: {quick})");
            answers.push(made.unwrap_err().to_string());
            let there = s.service.record(&s.caller, id).await;
            assert!(matches!(there, Err(ServiceError::NotFound(_))), "{there:?} (quick: {quick})");
        }
        // The same words for a parent elsewhere as for none: the answer
        // does not tell that an id exists in a vault the caller may not see.
        assert_eq!(answers[0], answers[1], "(quick: {quick})");
    }
}

/// A new record for a file's first save: with the caller's own vault and a
/// parent there, or as its own.
fn new_record(parent: Option<RecordId>) -> NewRecord {
    NewRecord {
        id: RecordId::random().unwrap(),
        parent,
        title: Sealed(b"d".to_vec()),
        fields: Sealed::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_record_goes_with_its_first_file_or_nothing_is_made() {
    let s = setup().await;
    // Another vault of the caller's, and another user with no rights here.
    let elsewhere = record_elsewhere(&s).await;
    let kdf = KdfWire { m_cost_kib: 256, t_cost: 1, p_cost: 1 };
    let (made, _) = s.service.meta.run(|m| m.create_user("w", Limits::DEFAULT, b"salt", kdf, b"hash"));
    made.unwrap();
    let (user, _) = s.service.meta.run(|m| m.user_by_name("w"));
    let stranger = Caller { user: user.unwrap().unwrap() };
    for quick in [true, false] {
        pace(&s, quick);
        // Made together: the record under its parent, the file in it.
        let r = new_record(Some(s.record));
        let f = new_file();
        let made = s.service.create_with_content(
            &s.caller,
            r.id,
            Some((s.vault, r.clone())),
            f.clone(),
            upload(b"x"),
        );
        made.await.unwrap();
        let there = s.service.record(&s.caller, r.id).await.unwrap();
        assert_eq!((there.vault, there.parent, there.version), (s.vault, Some(s.record), 1));
        assert_eq!(s.service.file(&s.caller, f.id).await.unwrap().record, r.id);
        assert_eq!(read_back(&s, f.id).await, b"x");
        // Refused, and nothing made: the record's id taken (sent again), a
        // parent in another vault, a vault the caller is not a member of,
        // a record other than the one named.
        let cases: Vec<(&Caller, RecordId, VaultId, NewRecord, &str)> = vec![
            (&s.caller, r.id, s.vault, r.clone(), "exists"),
            (&s.caller, RecordId::random().unwrap(), s.vault, new_record(Some(elsewhere)), "not found"),
            (&stranger, RecordId::random().unwrap(), s.vault, new_record(None), "not found"),
            (&s.caller, RecordId::random().unwrap(), s.vault, new_record(None), "bad request"),
        ];
        for (caller, path_id, vault, mut r, what) in cases {
            if what != "bad request" && what != "exists" {
                r.id = path_id;
            }
            let named = if what == "exists" { r.id } else { path_id };
            let f = new_file();
            let done = s
                .service
                .create_with_content(caller, named, Some((vault, r.clone())), f.clone(), upload(b"y"))
                .await;
            let refused = match &done {
                Err(ServiceError::Exists(_)) => "exists",
                Err(ServiceError::NotFound(_)) => "not found",
                Err(ServiceError::BadRequest(_)) => "bad request",
                _ => "something else",
            };
            assert_eq!(refused, what, "{done:?} (quick: {quick})");
            assert!(
                matches!(s.service.file(&s.caller, f.id).await, Err(ServiceError::NotFound(_))),
                "{what}"
            );
            if what != "exists" {
                assert!(
                    matches!(s.service.record(&s.caller, r.id).await, Err(ServiceError::NotFound(_))),
                    "{what}"
                );
                assert!(
                    matches!(s.service.record(&s.caller, path_id).await, Err(ServiceError::NotFound(_))),
                    "{what}"
                );
            }
        }
    }
}
