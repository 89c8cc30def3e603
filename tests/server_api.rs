//! Integration tests against a real `vaultfs serve` on loopback over TLS, through
//! the HTTPS remote (and, for malformed requests, raw HTTP).

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::server::TestServer;
use vaultfs::ids::{FileId, RecordId, VaultId};
use vaultfs::protocol::{
    FileUpdate, NewFile, NewRecord, NewVault, ParentChange, RecordUpdate, Rights, Sealed,
};
use vaultfs::remote::http::HttpRemote;
use vaultfs::remote::{collect, Remote, RemoteError, UploadBody};

fn sealed(s: &str) -> Sealed {
    Sealed(s.as_bytes().to_vec())
}

async fn new_vault(r: &HttpRemote, e2e_required: bool) -> VaultId {
    let id = VaultId::random().unwrap();
    r.create_vault(NewVault { id, name: sealed("vault"), e2e_required, wrapped_key: None }).await.unwrap();
    id
}

async fn new_record(r: &HttpRemote, vault: VaultId, parent: Option<RecordId>) -> RecordId {
    let id = RecordId::random().unwrap();
    r.create_record(vault, NewRecord { id, parent, title: sealed("title"), fields: sealed("") })
        .await
        .unwrap();
    id
}

async fn new_file(r: &HttpRemote, record: RecordId) -> FileId {
    let id = FileId::random().unwrap();
    r.create_file(
        record,
        NewFile { id, name: sealed("name"), e2e: true, mtime_ms: Some(1_000), meta: Sealed::default() },
    )
    .await
    .unwrap();
    id
}

async fn read(
    r: &HttpRemote,
    file: FileId,
    range: Option<std::ops::Range<u64>>,
) -> Result<Vec<u8>, RemoteError> {
    let c = r.download(file, range).await?;
    Ok(collect(c.stream).await.unwrap())
}

fn tls_client(s: &TestServer) -> reqwest::Client {
    vaultfs::remote::http::build_client(&s.access()).unwrap()
}

/// Deletes an (empty) vault as `user`, over raw HTTPS (the remote has no call for it).
async fn delete_vault(s: &TestServer, user: &str, vault: VaultId, version: u64) {
    let token = login_token(s, user).await;
    let deleted = tls_client(s)
        .delete(format!("{}/v1/vaults/{vault}", s.url))
        .bearer_auth(&token)
        .header("if-match", vaultfs::protocol::etag(version))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_life_of_vaults_records_and_files() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    assert_eq!(alice.me().await.unwrap().user, "alice");

    // Wallet: create, conflict on a stale version, update.
    assert_eq!(alice.wallet().await.unwrap(), None);
    assert_eq!(alice.put_wallet(b"w1".to_vec(), None).await.unwrap(), 1);
    assert!(matches!(alice.put_wallet(b"again".to_vec(), None).await, Err(RemoteError::Conflict { .. })));
    assert_eq!(alice.put_wallet(b"w2".to_vec(), Some(1)).await.unwrap(), 2);
    assert_eq!(alice.wallet().await.unwrap(), Some((b"w2".to_vec(), 2)));

    let vault = new_vault(&alice, false).await;
    let vaults = alice.vaults().await.unwrap();
    assert_eq!(vaults.len(), 1);
    assert_eq!((vaults[0].id, vaults[0].rights), (vault, Rights::Admin));

    // Nested records.
    let top = new_record(&alice, vault, None).await;
    let child = new_record(&alice, vault, Some(top)).await;
    let records = alice.records(vault).await.unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records.iter().find(|r| r.id == child).unwrap().parent, Some(top));
    // A record cannot move into its own descendant.
    assert!(matches!(
        alice
            .update_record(
                top,
                1,
                RecordUpdate { parent: Some(ParentChange { to: Some(child) }), ..Default::default() }
            )
            .await,
        Err(RemoteError::Refused(_))
    ));
    let moved = alice
        .update_record(
            child,
            1,
            RecordUpdate {
                parent: Some(ParentChange { to: None }),
                title: Some(sealed("t2")),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((moved.parent, moved.version, moved.title), (None, 2, sealed("t2")));

    // Files: empty at first, then content, then replaced.
    let file = new_file(&alice, top).await;
    let info = alice.file(file).await.unwrap();
    assert_eq!((info.size, info.version, info.mtime_ms), (0, 1, 1_000));
    assert_eq!(read(&alice, file, None).await.unwrap(), b"");
    let up = alice
        .upload(file, 1, true, Some(5_000), UploadBody::from_bytes(&b"first content"[..]))
        .await
        .unwrap();
    assert_eq!((up.version, up.size), (2, 13));
    assert_eq!(read(&alice, file, None).await.unwrap(), b"first content");
    let up = alice.upload(file, 2, true, None, UploadBody::from_bytes(&b"second"[..])).await.unwrap();
    assert_eq!(up.version, 3);
    assert_eq!(read(&alice, file, None).await.unwrap(), b"second");
    // A stale version is refused and changes nothing.
    assert_eq!(
        alice.upload(file, 2, true, None, UploadBody::from_bytes(&b"stale"[..])).await.unwrap_err(),
        RemoteError::Conflict { current: Some(3) }
    );
    assert_eq!(read(&alice, file, None).await.unwrap(), b"second");

    // Rename and move to another record; list by vault.
    let renamed = alice
        .update_file(
            file,
            3,
            FileUpdate { name: Some(sealed("new name")), record: Some(child), mtime_ms: Some(7), meta: None },
        )
        .await
        .unwrap();
    assert_eq!((renamed.record, renamed.version, renamed.mtime_ms), (child, 4, 7));
    assert_eq!(alice.files(vault).await.unwrap().len(), 1);

    // Deleting: records must be empty; files need the current version.
    assert!(matches!(alice.delete_record(child, 2).await, Err(RemoteError::Refused(_))));
    assert!(matches!(alice.delete_file(file, 3).await, Err(RemoteError::Conflict { .. })));
    alice.delete_file(file, 4).await.unwrap();
    assert!(matches!(alice.file(file).await, Err(RemoteError::NotFound(_))));
    alice.delete_record(child, 2).await.unwrap();
    alice.delete_record(top, 1).await.unwrap();
    assert!(alice.records(vault).await.unwrap().is_empty());
    // The blob store holds nothing once every file is gone (blobs go just
    // after the answer).
    let started = Instant::now();
    while !s.stored_blobs().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "leftover blobs: {:?}", s.stored_blobs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_reads() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    alice.upload(file, 1, true, None, UploadBody::from_bytes(data.clone())).await.unwrap();
    for (start, end) in [(0, 1), (0, 200_000), (65_536, 131_088), (199_999, 200_000), (1000, 1001)] {
        let got = read(&alice, file, Some(start..end)).await.unwrap();
        assert_eq!(got, data[start as usize..end as usize], "range {start}..{end}");
    }
    let c = alice.download(file, Some(10..20)).await.unwrap();
    assert_eq!((c.total_len, c.version, c.e2e), (200_000, 2, true));
    // A range running past the end is clipped; one starting past the end is refused.
    assert_eq!(read(&alice, file, Some(199_990..300_000)).await.unwrap(), data[199_990..]);
    assert_eq!(read(&alice, file, Some(200_000..200_001)).await, Err(RemoteError::BadRange));

    // Raw: suffix ranges, and the headers of a 206.
    let client = tls_client(&s);
    let token = login_token(&s, "alice").await;
    let resp = client
        .get(format!("{}/v1/files/{file}/content", s.url))
        .bearer_auth(&token)
        .header("range", "bytes=-5")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.headers()["content-range"], "bytes 199995-199999/200000");
    assert_eq!(resp.bytes().await.unwrap(), data[199_995..]);
    let resp = client
        .get(format!("{}/v1/files/{file}/content", s.url))
        .bearer_auth(&token)
        .header("range", "bytes=300000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 416);
    assert_eq!(resp.headers()["content-range"], "bytes */200000");
}

/// A new version replaces the stored content: the old blob is deleted after
/// the upload is answered (not before), so it may linger for a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_deletes_the_replaced_blob() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    alice.upload(file, 1, true, None, UploadBody::from_bytes(vec![1u8; 3000])).await.unwrap();
    let first = s.stored_blobs();
    assert_eq!(first.len(), 1, "{first:?}");
    alice.upload(file, 2, true, None, UploadBody::from_bytes(vec![2u8; 2000])).await.unwrap();
    assert_eq!(read(&alice, file, None).await.unwrap(), vec![2u8; 2000]);
    let started = Instant::now();
    loop {
        let now = s.stored_blobs();
        if now.len() == 1 && now != first {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the replaced blob stays: {now:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh session token for raw requests (the user's passphrase is known to the harness).
async fn login_token(s: &TestServer, user: &str) -> String {
    let client = tls_client(s);
    let pre: vaultfs::protocol::PreLogin = client
        .get(format!("{}/v1/prelogin", s.url))
        .query(&[("user", user)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let params = vaultfs::crypto::KdfParams {
        m_cost_kib: pre.kdf.m_cost_kib,
        t_cost: pre.kdf.t_cost,
        p_cost: pre.kdf.p_cost,
    };
    let key = vaultfs::crypto::login::derive_login_key(
        format!("{user} passphrase").as_bytes(),
        &pre.salt.0,
        params,
        support::server::TEST_KDF,
        vaultfs::crypto::login::LoginBinding { server: &s.access().identity().unwrap(), user },
    )
    .unwrap();
    let body = vaultfs::protocol::LoginRequest { user: user.into(), login_key: Sealed(key.to_vec()) };
    let session: vaultfs::protocol::Session =
        client.post(format!("{}/v1/login", s.url)).json(&body).send().await.unwrap().json().await.unwrap();
    session.token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_exactly_one_wins() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    let bob_view = HttpRemote::login(&s.access(), "alice", b"alice passphrase", support::server::TEST_KDF)
        .await
        .unwrap();
    for round in 0..5u64 {
        let expected = 1 + round;
        let a = vec![b'a'; 300_000];
        let b = vec![b'b'; 300_000];
        let (ra, rb) = tokio::join!(
            alice.upload(file, expected, true, None, UploadBody::from_bytes(a.clone())),
            bob_view.upload(file, expected, true, None, UploadBody::from_bytes(b.clone())),
        );
        let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} {rb:?}");
        let loser = if ra.is_ok() { &rb } else { &ra };
        assert!(matches!(loser, Err(RemoteError::Conflict { .. })), "{loser:?}");
        let content = read(&alice, file, None).await.unwrap();
        assert!(content == a || content == b, "content must be one writer's, whole");
        assert_eq!(alice.file(file).await.unwrap().version, expected + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_the_body_is_read_reaches_the_client() {
    // A stale upload is refused before its body is read. Closing the
    // connection on the unread body made the kernel reset it, and the client
    // then saw a broken pipe (an outage) instead of the conflict it needs to
    // know about; the server reads what is in flight before it answers.
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    alice.upload(file, 1, true, None, UploadBody::from_bytes(vec![1u8; 1000])).await.unwrap();
    for round in 0..5 {
        let stale = UploadBody::from_bytes(vec![2u8; 24_000_000]);
        let err = alice.upload(file, 1, true, None, stale).await.unwrap_err();
        assert!(matches!(err, RemoteError::Conflict { .. }), "round {round}: {err:?}");
    }
    assert_eq!(read(&alice, file, None).await.unwrap(), vec![1u8; 1000]);

    // The same for a session that has ended (refused before the handler runs).
    let token = login_token(&s, "alice").await;
    let client = tls_client(&s);
    let ended = client.post(format!("{}/v1/logout", s.url)).bearer_auth(&token).send().await.unwrap();
    assert!(ended.status().is_success(), "{}", ended.status());
    for round in 0..3 {
        let resp = client
            .put(format!("{}/v1/files/{file}/content", s.url))
            .bearer_auth(&token)
            .header("if-match", "\"2\"")
            .header("x-vaultfs-e2e", "1")
            .body(vec![3u8; 24_000_000])
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(resp.status(), 401, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_upload_asking_for_a_conflict_copy_keeps_both() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let record = new_record(&alice, vault, None).await;
    let file = new_file(&alice, record).await;
    alice.upload(file, 1, false, None, UploadBody::from_bytes(&b"theirs"[..])).await.unwrap();
    // Ours still expects version 1: it goes to the copy, theirs stays.
    let copy = FileId::random().unwrap();
    let mut body = UploadBody::from_bytes(&b"ours"[..]);
    body.conflict_copy =
        Some(NewFile { id: copy, name: sealed("copy"), e2e: false, mtime_ms: None, meta: Sealed::default() });
    let up = alice.upload(file, 1, false, None, body).await.unwrap();
    assert_eq!(up.conflict_copy, Some(copy));
    assert_eq!(read(&alice, file, None).await.unwrap(), b"theirs");
    assert_eq!(read(&alice, copy, None).await.unwrap(), b"ours");
    let files = alice.files(vault).await.unwrap();
    assert_eq!(files.iter().find(|f| f.id == copy).unwrap().record, record);
    // Not stale: the file itself takes it, no copy is made.
    let mut body = UploadBody::from_bytes(&b"next"[..]);
    let unused = FileId::random().unwrap();
    body.conflict_copy = Some(NewFile {
        id: unused,
        name: sealed("copy"),
        e2e: false,
        mtime_ms: None,
        meta: Sealed::default(),
    });
    let up = alice.upload(file, 2, false, None, body).await.unwrap();
    assert_eq!((up.conflict_copy, up.version), (None, 3));
    assert!(matches!(alice.file(unused).await, Err(RemoteError::NotFound(_))));
    // Stale, and the copy's id is taken: refused once the content was
    // stored, which then leaves no blob behind: the blobs left are the two
    // files' (replaced ones are deleted just after the answer).
    let blobs_settle_at = |n: usize| {
        let s = &s;
        async move {
            for _ in 0..100 {
                if s.stored_blobs().len() == n {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(blobs_settle_at(2).await, "{:?}", s.stored_blobs());
    let mut body = UploadBody::from_bytes(&b"lost cause"[..]);
    body.conflict_copy =
        Some(NewFile { id: copy, name: sealed("copy"), e2e: false, mtime_ms: None, meta: Sealed::default() });
    let refused = alice.upload(file, 2, false, None, body).await;
    assert!(matches!(refused, Err(RemoteError::Exists(_))), "{refused:?}");
    assert_eq!(read(&alice, copy, None).await.unwrap(), b"ours");
    assert!(blobs_settle_at(2).await, "the refused content's blob is gone: {:?}", s.stored_blobs());
    // A malformed header is refused with a clear 400.
    let resp = tls_client(&s)
        .put(format!("{}/v1/files/{file}/content", s.url))
        .bearer_auth(login_token(&s, "alice").await)
        .header("if-match", "\"3\"")
        .header("x-vaultfs-e2e", "0")
        .header("x-vaultfs-conflict-copy", "not-an-id")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_limit_is_enforced_before_reading_the_body() {
    let s = TestServer::start();
    let alice = s.user("alice", &["--upload-limit", "100kB", "--e2e-limit", "50kB"]).await;
    let limits = alice.me().await.unwrap().limits;
    assert_eq!((limits.upload_limit, limits.e2e_limit, limits.image_max_edge), (100_000, 50_000, 2560));
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    alice.upload(file, 1, true, None, UploadBody::from_bytes(vec![1u8; 100_000])).await.unwrap();
    let err =
        alice.upload(file, 2, true, None, UploadBody::from_bytes(vec![2u8; 100_001])).await.unwrap_err();
    assert!(matches!(err, RemoteError::TooLarge(_)), "{err:?}");
    assert_eq!(read(&alice, file, None).await.unwrap(), vec![1u8; 100_000], "old content must stay");

    // A declared 10 GB body that never arrives: refused at once, not after reading.
    let token = login_token(&s, "alice").await;
    let never = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
    let started = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        tls_client(&s)
            .put(format!("{}/v1/files/{file}/content", s.url))
            .bearer_auth(&token)
            .header("if-match", "\"2\"")
            .header("x-vaultfs-e2e", "1")
            .header("content-length", "10000000000")
            .body(reqwest::Body::wrap_stream(never))
            .send(),
    )
    .await
    .expect("the server must answer without waiting for the body")
    .unwrap();
    assert_eq!(resp.status(), 413);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Chunked (no declared length): cut off once past the limit.
    let chunks =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 10_000]))));
    let resp = tls_client(&s)
        .put(format!("{}/v1/files/{file}/content", s.url))
        .bearer_auth(&token)
        .header("if-match", "\"2\"")
        .header("x-vaultfs-e2e", "1")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(alice.file(file).await.unwrap().version, 2);
    assert!(s.partial_uploads().is_empty(), "no partial upload may remain: {:?}", s.partial_uploads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_required_refuses_plaintext() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let strict = new_vault(&alice, true).await;
    let file = new_file(&alice, new_record(&alice, strict, None).await).await;
    assert_eq!(
        alice.upload(file, 1, false, None, UploadBody::from_bytes(&b"plain"[..])).await.unwrap_err(),
        RemoteError::E2eRequired
    );
    alice.upload(file, 1, true, None, UploadBody::from_bytes(&b"VLTF..."[..])).await.unwrap();
    let lax = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, lax, None).await).await;
    alice.upload(file, 1, false, None, UploadBody::from_bytes(&b"big plain file"[..])).await.unwrap();
    assert!(!alice.download(file, None).await.unwrap().e2e);
}

/// A new file created with its content in one request: stored at once with
/// its manifest and time; the same id again is refused (409 exists) and
/// changes nothing; a reader, a stranger, a missing record, plaintext in a
/// vault that requires end-to-end encryption and a request without
/// `If-None-Match: *` or a name are refused, and none leaves a file or a
/// blob behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_is_created_with_its_content_in_one_request() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let bob = s.user("bob", &[]).await;
    let eve = s.user("eve", &[]).await;
    let vault = new_vault(&alice, true).await;
    let record = new_record(&alice, vault, None).await;
    let member = vaultfs::protocol::Member { user: "bob".into(), rights: Rights::Read, wrapped_key: None };
    alice.set_member(vault, member).await.unwrap();
    let new =
        |id| NewFile { id, name: sealed("n"), e2e: true, mtime_ms: Some(7_000), meta: sealed("manifest") };
    let id = FileId::random().unwrap();
    let done = alice
        .create_with_content(record, None, new(id), UploadBody::from_bytes(&b"content"[..]))
        .await
        .unwrap();
    assert_eq!((done.version, done.size), (2, 7));
    let info = alice.file(id).await.unwrap();
    assert_eq!((info.version, info.size, info.mtime_ms, info.record), (2, 7, 7_000, record));
    assert_eq!(info.meta, sealed("manifest"));
    assert_eq!(info.name, sealed("n"));
    assert_eq!(read(&alice, id, None).await.unwrap(), b"content");
    let changes = |vaults: Vec<vaultfs::protocol::VaultInfo>| {
        vaults.into_iter().find(|v| v.id == vault).unwrap().changes
    };
    let changed = changes(alice.vaults().await.unwrap());
    let blobs = s.stored_blobs().len();

    // The same id again (a request sent twice): refused, nothing changed.
    let again = alice.create_with_content(record, None, new(id), UploadBody::from_bytes(&b"other"[..])).await;
    assert!(matches!(again, Err(RemoteError::Exists(_))), "{again:?}");
    assert_eq!(read(&alice, id, None).await.unwrap(), b"content");
    // A reader, a stranger, a record that does not exist, plaintext here.
    let body = || UploadBody::from_bytes(&b"x"[..]);
    let refused = bob.create_with_content(record, None, new(FileId::random().unwrap()), body()).await;
    assert!(matches!(refused, Err(RemoteError::Forbidden(_))), "{refused:?}");
    let refused = eve.create_with_content(record, None, new(FileId::random().unwrap()), body()).await;
    assert!(matches!(refused, Err(RemoteError::NotFound(_))), "{refused:?}");
    let nowhere = RecordId::random().unwrap();
    let refused = alice.create_with_content(nowhere, None, new(FileId::random().unwrap()), body()).await;
    assert!(matches!(refused, Err(RemoteError::NotFound(_))), "{refused:?}");
    let plain = NewFile { e2e: false, ..new(FileId::random().unwrap()) };
    assert_eq!(
        alice.create_with_content(record, None, plain, body()).await.unwrap_err(),
        RemoteError::E2eRequired
    );
    // Raw requests without the precondition or the name.
    let token = login_token(&s, "alice").await;
    let client = tls_client(&s);
    let put = |headers: &[(&str, &str)]| {
        let mut r = client
            .put(format!("{}/v1/records/{record}/files/{}", s.url, FileId::random().unwrap()))
            .bearer_auth(&token)
            .header("x-vaultfs-e2e", "1")
            .body("x");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(put(&[("x-vaultfs-name", "bg=="), ("x-vaultfs-meta", "bQ==")]).await.unwrap()), 428);
    assert_eq!(status(put(&[("if-none-match", "*"), ("x-vaultfs-meta", "bQ==")]).await.unwrap()), 400);
    assert_eq!(status(put(&[("if-none-match", "*"), ("x-vaultfs-name", "bg==")]).await.unwrap()), 400);
    let files = alice.files(vault).await.unwrap();
    assert_eq!(files.len(), 1, "only the first file exists: {files:?}");
    assert_eq!(changes(alice.vaults().await.unwrap()), changed, "no refusal changed the vault");
    assert!(s.partial_uploads().is_empty(), "{:?}", s.partial_uploads());
    assert_eq!(s.stored_blobs().len(), blobs, "no refusal left a blob");
}

/// A new record created with its first file, in one request: both appear,
/// the record under its parent with its title, and the vault's change number
/// moves. A reader, a stranger, a parent in another vault, a record id
/// already taken and malformed record headers are refused, and none leaves
/// a record, a file or a blob behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_created_with_its_first_file_in_one_request() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let bob = s.user("bob", &[]).await;
    let eve = s.user("eve", &[]).await;
    let vault = new_vault(&alice, true).await;
    let parent = new_record(&alice, vault, None).await;
    let elsewhere = new_record(&alice, new_vault(&alice, true).await, None).await;
    let member = vaultfs::protocol::Member { user: "bob".into(), rights: Rights::Read, wrapped_key: None };
    alice.set_member(vault, member).await.unwrap();
    let file = || NewFile {
        id: FileId::random().unwrap(),
        name: sealed("n"),
        e2e: true,
        mtime_ms: Some(7_000),
        meta: sealed("manifest"),
    };
    let record = |parent| NewRecord {
        id: RecordId::random().unwrap(),
        parent,
        title: sealed("dir"),
        fields: sealed(""),
    };
    let body = || UploadBody::from_bytes(&b"content"[..]);
    let changes = |vaults: Vec<vaultfs::protocol::VaultInfo>| {
        vaults.into_iter().find(|v| v.id == vault).unwrap().changes
    };
    let before = changes(alice.vaults().await.unwrap());
    let (r, f) = (record(Some(parent)), file());
    alice.create_with_content(r.id, Some((vault, r.clone())), f.clone(), body()).await.unwrap();
    let made = alice.records(vault).await.unwrap().into_iter().find(|x| x.id == r.id).unwrap();
    assert_eq!((made.vault, made.parent, made.title, made.version), (vault, Some(parent), sealed("dir"), 1));
    let info = alice.file(f.id).await.unwrap();
    assert_eq!((info.record, info.version, info.size), (r.id, 2, 7));
    assert_eq!(read(&alice, f.id, None).await.unwrap(), b"content");
    let changed = changes(alice.vaults().await.unwrap());
    assert!(changed > before, "the vault's change number moved");
    let (records, files, blobs) = (
        alice.records(vault).await.unwrap().len(),
        alice.files(vault).await.unwrap().len(),
        s.stored_blobs().len(),
    );

    // Refused: the record's id taken, a parent in another vault, a reader,
    // a stranger.
    let again = alice.create_with_content(r.id, Some((vault, r.clone())), file(), body()).await;
    assert!(matches!(again, Err(RemoteError::Exists(_))), "{again:?}");
    let other = record(Some(elsewhere));
    let refused = alice.create_with_content(other.id, Some((vault, other.clone())), file(), body()).await;
    assert!(matches!(refused, Err(RemoteError::NotFound(_))), "{refused:?}");
    let other = record(None);
    let refused = bob.create_with_content(other.id, Some((vault, other.clone())), file(), body()).await;
    assert!(matches!(refused, Err(RemoteError::Forbidden(_))), "{refused:?}");
    let refused = eve.create_with_content(other.id, Some((vault, other.clone())), file(), body()).await;
    assert!(matches!(refused, Err(RemoteError::NotFound(_))), "{refused:?}");
    // Malformed record headers.
    let token = login_token(&s, "alice").await;
    let client = tls_client(&s);
    let put = |headers: &[(&str, String)]| {
        let mut r = client
            .put(format!(
                "{}/v1/records/{}/files/{}",
                s.url,
                RecordId::random().unwrap(),
                FileId::random().unwrap()
            ))
            .bearer_auth(&token)
            .header("if-none-match", "*")
            .header("x-vaultfs-e2e", "1")
            .header("x-vaultfs-name", "bg==")
            .header("x-vaultfs-meta", "bQ==")
            .body("x");
        for (k, v) in headers {
            r = r.header(*k, v);
        }
        r.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    let v = vault.to_string();
    for (headers, why) in [
        (vec![("x-vaultfs-record-vault", v.clone())], "no title"),
        (vec![("x-vaultfs-record-title", "ZA==".into())], "a title without a vault"),
        (
            vec![("x-vaultfs-record-vault", "nope".into()), ("x-vaultfs-record-title", "ZA==".into())],
            "vault id",
        ),
        (vec![("x-vaultfs-record-vault", v.clone()), ("x-vaultfs-record-title", "!".into())], "title base64"),
        (
            vec![
                ("x-vaultfs-record-vault", v.clone()),
                ("x-vaultfs-record-title", "ZA==".into()),
                ("x-vaultfs-record-parent", "nope".into()),
            ],
            "parent id",
        ),
    ] {
        assert_eq!(status(put(&headers).await.unwrap()), 400, "{why}");
    }
    assert_eq!(alice.records(vault).await.unwrap().len(), records, "no refusal made a record");
    assert_eq!(alice.files(vault).await.unwrap().len(), files, "no refusal made a file");
    assert_eq!(changes(alice.vaults().await.unwrap()), changed, "no refusal changed the vault");
    assert!(s.partial_uploads().is_empty(), "{:?}", s.partial_uploads());
    assert_eq!(s.stored_blobs().len(), blobs, "no refusal left a blob");
}

/// `POST /v1/deletes`: each object on its own terms, in the order given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_deletes_in_one_request_each_on_its_own_terms() {
    use vaultfs::protocol::{DeleteItem as I, DeleteOutcome as O, Member, MAX_DELETES};
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let bob = s.user("bob", &[]).await;
    let vault = new_vault(&alice, false).await;
    let (top, full) = (new_record(&alice, vault, None).await, new_record(&alice, vault, None).await);
    let child = new_record(&alice, vault, Some(top)).await;
    let (a, b, kept) =
        (new_file(&alice, child).await, new_file(&alice, child).await, new_file(&alice, full).await);
    alice.upload(b, 1, true, None, UploadBody::from_bytes(&b"b"[..])).await.unwrap();
    // Bob may read alice's vault only; his own he may write.
    let member = Member { user: "bob".into(), rights: Rights::Read, wrapped_key: None };
    alice.set_member(vault, member).await.unwrap();
    let bobs = new_file(&bob, new_record(&bob, new_vault(&bob, false).await, None).await).await;

    let items = vec![
        I::File { id: a, version: 1 },
        I::File { id: b, version: 1 }, // uploaded since: version 2
        I::Record { id: full, version: 1 },
        I::File { id: FileId::random().unwrap(), version: 1 },
        I::File { id: b, version: 2 },
        I::Record { id: child, version: 1 }, // empty by now
        I::Record { id: top, version: 1 },
        I::File { id: bobs, version: 1 }, // another user's
    ];
    let outcomes = alice.delete_many(items).await.unwrap();
    assert_eq!(outcomes.len(), 8);
    assert_eq!(outcomes[0], O::Deleted);
    assert_eq!(outcomes[1], O::Conflict { current: 2 });
    assert!(
        matches!(&outcomes[2], O::Refused { message } if message.contains("not empty")),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(outcomes[3..8], [O::NotFound, O::Deleted, O::Deleted, O::Deleted, O::NotFound]);
    assert!(matches!(alice.file(a).await, Err(RemoteError::NotFound(_))));
    let records: Vec<RecordId> = alice.records(vault).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(records, [full], "child and top went, after what was in them");
    assert!(alice.file(kept).await.is_ok() && bob.file(bobs).await.is_ok(), "the others are kept");
    // Read rights: refused, kept.
    let outcomes = bob.delete_many(vec![I::File { id: kept, version: 1 }]).await.unwrap();
    assert!(matches!(&outcomes[0], O::Forbidden { message } if message.contains("read")), "{outcomes:?}");
    assert!(alice.file(kept).await.is_ok());
    // Too many at once: refused whole.
    let many = vec![I::File { id: kept, version: 1 }; MAX_DELETES + 1];
    assert!(matches!(alice.delete_many(many).await, Err(RemoteError::Protocol(_))));
    assert!(alice.file(kept).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_cannot_reach_each_others_vaults_even_by_guessing_ids() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let bob = s.user("bob", &[]).await;
    let vault = new_vault(&alice, false).await;
    let record = new_record(&alice, vault, None).await;
    let file = new_file(&alice, record).await;
    alice.upload(file, 1, true, None, UploadBody::from_bytes(&b"alice's secret"[..])).await.unwrap();

    // Bob sees nothing and can touch nothing; every answer is "not found".
    assert!(bob.vaults().await.unwrap().is_empty());
    let nf = |r: Result<_, RemoteError>| matches!(r, Err(RemoteError::NotFound(_)));
    assert!(nf(bob.records(vault).await.map(|_| ())));
    assert!(nf(bob.files(vault).await.map(|_| ())));
    assert!(nf(bob.file(file).await.map(|_| ())));
    assert!(nf(bob.download(file, None).await.map(|_| ())));
    assert!(nf(bob.upload(file, 2, true, None, UploadBody::from_bytes(&b"x"[..])).await.map(|_| ())));
    assert!(nf(bob.update_file(file, 2, FileUpdate::default()).await.map(|_| ())));
    assert!(nf(bob.delete_file(file, 2).await));
    assert!(nf(bob.delete_record(record, 1).await));
    assert!(nf(bob.update_record(record, 1, RecordUpdate::default()).await.map(|_| ())));
    let rid = RecordId::random().unwrap();
    assert!(nf(bob
        .create_record(vault, NewRecord { id: rid, parent: None, title: sealed("t"), fields: sealed("") })
        .await
        .map(|_| ())));
    assert!(nf(bob
        .create_file(
            record,
            NewFile {
                id: FileId::random().unwrap(),
                name: sealed("n"),
                e2e: true,
                mtime_ms: None,
                meta: Sealed::default()
            }
        )
        .await
        .map(|_| ())));
    // Bob cannot put a record of his own vault under alice's record, nor move his file there.
    let bob_vault = new_vault(&bob, false).await;
    assert!(nf(bob
        .create_record(
            bob_vault,
            NewRecord {
                id: RecordId::random().unwrap(),
                parent: Some(record),
                title: sealed("t"),
                fields: sealed("")
            }
        )
        .await
        .map(|_| ())));
    let bob_file = new_file(&bob, new_record(&bob, bob_vault, None).await).await;
    assert!(nf(bob
        .update_file(bob_file, 1, FileUpdate { record: Some(record), ..Default::default() })
        .await
        .map(|_| ())));
    // Nor reuse alice's ids for objects of his own.
    assert!(matches!(
        bob.create_vault(NewVault { id: vault, name: sealed("v"), e2e_required: false, wrapped_key: None })
            .await,
        Err(RemoteError::Exists(_))
    ));
    assert_eq!(read(&alice, file, None).await.unwrap(), b"alice's secret");

    // Read-only membership: bob reads, cannot write (403, not 404: he is a member).
    let client = tls_client(&s);
    let token = login_token(&s, "alice").await;
    let resp = client
        .put(format!("{}/v1/vaults/{vault}/members/bob", s.url))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "rights": "read" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(read(&bob, file, None).await.unwrap(), b"alice's secret");
    assert!(matches!(
        bob.upload(file, 2, true, None, UploadBody::from_bytes(&b"x"[..])).await,
        Err(RemoteError::Forbidden(_))
    ));
    assert!(matches!(bob.delete_file(file, 2).await, Err(RemoteError::Forbidden(_))));
    let bob_token = login_token(&s, "bob").await;
    let resp = client
        .put(format!("{}/v1/vaults/{vault}/members/bob", s.url))
        .bearer_auth(&bob_token)
        .json(&serde_json::json!({ "rights": "admin" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "a reader cannot make himself admin");

    // No token, or a wrong one: 401 with a Bearer challenge.
    let resp = client.get(format!("{}/v1/vaults", s.url)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let resp = client.get(format!("{}/v1/vaults", s.url)).bearer_auth("00".repeat(32)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // Wrong login key, and an unknown user, look the same.
    assert!(matches!(
        HttpRemote::login(&s.access(), "alice", b"wrong", support::server::TEST_KDF).await,
        Err(RemoteError::Unauthorized(_))
    ));
    assert!(matches!(
        HttpRemote::login(&s.access(), "nobody", b"x", support::server::TEST_KDF).await,
        Err(RemoteError::Unauthorized(_))
    ));
    // Health needs no authentication.
    assert_eq!(client.get(format!("{}/v1/health", s.url)).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_4xx_answers() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    let token = login_token(&s, "alice").await;
    let client = tls_client(&s);
    let url = |p: &str| format!("{}{p}", s.url);

    // A fresh connection per case: an early 413 closes its connection.
    let fresh = || tls_client(&s);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (fresh().post(url("/v1/vaults")).body("{not json"), 400, "bad_request"),
        (
            client.post(url("/v1/vaults")).header("content-type", "application/json").body("{not json"),
            400,
            "bad_request",
        ),
        (
            client.post(url("/v1/vaults")).json(&serde_json::json!({"id": "xyz", "name": ""})),
            400,
            "bad_request",
        ),
        (
            client.post(url("/v1/vaults")).json(&serde_json::json!({"id": "00".repeat(16), "name": "!!!"})),
            400,
            "bad_request",
        ),
        (fresh().get(url("/v1/files/not-an-id")), 400, "bad_request"),
        (fresh().get(url("/v1/files/../../etc/passwd")), 404, "not_found"),
        (fresh().get(url(&format!("/v1/files/{}", "00".repeat(16)))), 404, "not_found"),
        (
            client.patch(url(&format!("/v1/files/{file}"))).json(&serde_json::json!({})),
            428,
            "precondition_required",
        ),
        (
            client
                .patch(url(&format!("/v1/files/{file}")))
                .header("if-match", "3")
                .json(&serde_json::json!({})),
            400,
            "bad_request",
        ),
        (
            client.put(url(&format!("/v1/files/{file}/content"))).header("if-match", "\"1\"").body("x"),
            400,
            "bad_request",
        ),
        (
            client
                .put(url(&format!("/v1/files/{file}/content")))
                .header("if-match", "\"1\"")
                .header("x-vaultfs-e2e", "yes")
                .body("x"),
            400,
            "bad_request",
        ),
        (
            client.put(url(&format!("/v1/files/{file}/content"))).header("x-vaultfs-e2e", "1").body("x"),
            428,
            "precondition_required",
        ),
        (
            client
                .post(url("/v1/vaults"))
                .json(&serde_json::json!({"id": "00".repeat(16), "name": "A".repeat(4 << 20)})),
            413,
            "too_large",
        ),
        (
            client.put(url("/v1/wallet")).header("if-none-match", "*").body(vec![0u8; 3 << 20]),
            413,
            "too_large",
        ),
        (fresh().delete(url("/v1/vaults")), 405, ""),
        (fresh().get(url("/v2/whatever")), 404, "not_found"),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let resp = match req.bearer_auth(&token).send().await {
            Ok(resp) => resp,
            // The server answers 413 without reading an oversized body; an HTTP/1.1
            // client still pushing it may see the connection close before it reads
            // that answer. Either way nothing was accepted.
            Err(e) if status == 413 => {
                assert!(e.is_request() || e.is_body(), "case {i}: {e}");
                continue;
            }
            Err(e) => panic!("case {i}: {e}"),
        };
        assert_eq!(resp.status().as_u16(), status, "case {i}");
        if !code.is_empty() {
            let body: vaultfs::protocol::ErrorBody =
                resp.json().await.unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(body.error.code, code, "case {i}: {}", body.error.message);
            assert!(!body.error.message.is_empty());
        }
    }
    // Login with a key of the wrong size, and a prelogin without a user.
    let resp = client
        .post(url("/v1/login"))
        .json(&serde_json::json!({"user": "alice", "login_key": "AAAA"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = client.get(url("/v1/prelogin")).send().await.unwrap();
    assert_eq!(resp.status(), 400);
    // The server still works after all that.
    assert_eq!(alice.file(file).await.unwrap().version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prelogin_does_not_reveal_which_users_exist() {
    let s = TestServer::start();
    s.add_user("alice", &[]);
    let client = tls_client(&s);
    let ask = |u: &'static str| {
        let c = client.clone();
        let url = s.url.clone();
        async move {
            let r = c.get(format!("{url}/v1/prelogin")).query(&[("user", u)]).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<vaultfs::protocol::PreLogin>().await.unwrap()
        }
    };
    let (known, unknown, unknown_again) = (ask("alice").await, ask("mallory").await, ask("mallory").await);
    assert_eq!(known.kdf, unknown.kdf);
    assert_eq!(known.salt.0.len(), unknown.salt.0.len());
    assert_eq!(unknown.salt, unknown_again.salt, "fake answers must be stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_refused_before_anything_is_sent() {
    let s = TestServer::start();
    s.add_user("alice", &[]);
    let mut access = s.access();
    access.trust = Some(vaultfs::remote::tls::Trust::Pinned(format!("sha256:{}", "ab".repeat(32))));
    let err = HttpRemote::login(&access, "alice", b"alice passphrase", support::server::TEST_KDF)
        .await
        .unwrap_err();
    match err {
        RemoteError::Unavailable(msg) => assert!(msg.contains("does not match the pinned"), "{msg}"),
        other => panic!("expected a pin failure, got {other:?}"),
    }
    let fp = vaultfs::remote::http::probe_fingerprint(&s.url).await.unwrap();
    assert_eq!(Some(fp), s.fingerprint);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_upload_the_old_version_survives_and_nothing_partial_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = TestServer::start_in(&data, &[]);
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    let old: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    alice.upload(file, 1, true, None, UploadBody::from_bytes(old.clone())).await.unwrap();

    // Stream a 250 MB upload slowly enough to kill the server in the middle of it.
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let piece = Bytes::from(vec![0x77u8; 1 << 20]);
    let body = futures_util::stream::unfold(0u32, move |n| {
        let piece = piece.clone();
        let counter = std::sync::Arc::clone(&counter);
        async move {
            if n == 250 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            counter.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(piece), n + 1))
        }
    });
    let upload = tokio::spawn(async move {
        alice
            .upload(
                file,
                2,
                true,
                None,
                vaultfs::remote::UploadBody {
                    len: Some(250 << 20),
                    stream: Box::pin(body),
                    conflict_copy: None,
                    meta: None,
                },
            )
            .await
    });
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 40 << 20 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let partial = s.partial_uploads();
    assert!(!partial.is_empty(), "an upload should be in progress");
    s.kill_hard();
    let result = tokio::time::timeout(Duration::from_secs(30), upload)
        .await
        .expect("upload must fail, not hang")
        .unwrap();
    assert!(matches!(result, Err(RemoteError::Unavailable(_))), "{result:?}");

    // Restart on the same data: the old version is intact, no partial file remains.
    let s2 = TestServer::start_in(&data, &[]);
    let alice = HttpRemote::login(&s2.access(), "alice", b"alice passphrase", support::server::TEST_KDF)
        .await
        .unwrap();
    let info = alice.file(file).await.unwrap();
    assert_eq!((info.version, info.size), (2, old.len() as u64));
    assert_eq!(read(&alice, file, None).await.unwrap(), old);
    assert!(s2.partial_uploads().is_empty(), "partial upload left behind: {:?}", s2.partial_uploads());
    assert_eq!(s2.stored_blobs().len(), 1, "exactly the old blob remains");
}

/// Peak resident memory of `pid` since the last reset, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_and_download_stream_through_the_server_in_bounded_memory() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    let _ = std::fs::write(format!("/proc/{}/clear_refs", s.pid()), "5");
    let base = peak_rss_mib(s.pid());

    // 120 MiB, streamed in 1 MiB pieces (on S3: 24 parts of 5 MiB).
    let piece = |i: u64| Bytes::from((0..1u64 << 20).map(|j| ((i * 7 + j) % 251) as u8).collect::<Vec<u8>>());
    let body = futures_util::stream::iter((0..120).map(move |i| Ok::<_, std::io::Error>(piece(i))));
    let body = UploadBody { len: Some(120 << 20), stream: Box::pin(body), conflict_copy: None, meta: None };
    let done = alice.upload(file, 1, false, None, body).await.unwrap();
    assert_eq!(done.size, 120 << 20);
    let after_upload = peak_rss_mib(s.pid());

    let back = read(&alice, file, None).await.unwrap();
    assert_eq!(back.len(), 120 << 20);
    assert!(back.chunks(1 << 20).enumerate().all(|(i, c)| c == &piece(i as u64)[..]), "content differs");
    // A range across a 5 MiB part boundary, and the last bytes.
    let range = (5 << 20) - 1000..(5 << 20) + 1000;
    assert_eq!(
        read(&alice, file, Some(range.clone())).await.unwrap(),
        &back[range.start as usize..range.end as usize]
    );
    let tail = (120 << 20) - 10..120 << 20;
    assert_eq!(read(&alice, file, Some(tail.clone())).await.unwrap(), &back[tail.start as usize..]);
    let after_download = peak_rss_mib(s.pid());
    println!("server peak RSS: {base} MiB idle, {after_upload} MiB after upload, {after_download} MiB after download");
    assert!(after_upload < base + 64, "the upload grew the server to {after_upload} MiB (from {base})");
    assert!(after_download < base + 64, "the download grew the server to {after_download} MiB (from {base})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_refused_after_several_parts_leaves_nothing_behind() {
    let s = TestServer::start();
    let alice = s.user("alice", &["--upload-limit", "12MB", "--e2e-limit", "1MB"]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    alice.upload(file, 1, false, None, UploadBody::from_bytes(vec![1u8; 1000])).await.unwrap();
    // No declared length: the limit is found only after 12 MB (on S3, two
    // 5 MiB parts already sent).
    let body =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![2u8; 1 << 20]))));
    let body = UploadBody { len: None, stream: Box::pin(body), conflict_copy: None, meta: None };
    let refused = alice.upload(file, 2, false, None, body).await;
    // The server answers 413 and closes the connection while the client is
    // still sending; the client may see the answer or only the broken pipe.
    // (The mount never sends such a body: it declares the length of what it
    // seals, and stops a stream itself at the limit with EFBIG.)
    assert!(
        matches!(refused, Err(RemoteError::TooLarge(_)) | Err(RemoteError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(read(&alice, file, None).await.unwrap(), vec![1u8; 1000], "the old version stays");
    assert!(s.partial_uploads().is_empty(), "left behind: {:?}", s.partial_uploads());
    assert_eq!(s.stored_blobs().len(), 1, "only the old blob: {:?}", s.stored_blobs());
}

/// A passphrase change stores the new login key and the wallet sealed under the
/// new passphrase in one transaction, and ends the user's other sessions; one
/// that names a stale wallet version changes nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_change_swaps_login_and_wallet_together_and_ends_other_sessions() {
    let s = TestServer::start();
    let mut alice = s.user("alice", &[]).await;
    assert_eq!(alice.put_wallet(b"sealed under the old one".to_vec(), None).await.unwrap(), 1);
    let other = login_token(&s, "alice").await;
    let me = |token: String| {
        let client = tls_client(&s);
        let url = format!("{}/v1/me", s.url);
        async move { client.get(url).bearer_auth(token).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(me(other.clone()).await, 200);

    // A stale wallet version: refused, and the login key did not change either.
    let stale = alice
        .change_passphrase(&s.access(), b"new pass", support::server::TEST_KDF, b"new wallet".to_vec(), 7)
        .await;
    assert!(matches!(stale, Err(RemoteError::Conflict { .. }) | Err(RemoteError::Protocol(_))), "{stale:?}");
    assert_eq!(alice.wallet().await.unwrap().unwrap(), (b"sealed under the old one".to_vec(), 1));
    assert_eq!(me(login_token(&s, "alice").await).await, 200, "the old passphrase still logs in");

    let version = alice
        .change_passphrase(&s.access(), b"new pass", support::server::TEST_KDF, b"new wallet".to_vec(), 1)
        .await;
    assert_eq!(version.unwrap(), 2);
    assert_eq!(alice.wallet().await.unwrap().unwrap(), (b"new wallet".to_vec(), 2), "this session goes on");
    assert_eq!(me(other).await, 401, "the other session ended");
    let old = HttpRemote::login(&s.access(), "alice", b"alice passphrase", support::server::TEST_KDF).await;
    assert!(matches!(old, Err(RemoteError::Unauthorized(_))), "{old:?}");
    HttpRemote::login(&s.access(), "alice", b"new pass", support::server::TEST_KDF)
        .await
        .expect("the new passphrase logs in");
}

/// The change feed over HTTPS: a member reads what changed, in pages;
/// a non-member gets "not found" as for any vault of someone else; a bogus
/// `since` or `limit` is a 400; a `since` ahead of the vault, and a vault
/// deleted meanwhile, are told apart (410 "relist", 404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_pages_and_keeps_to_members() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let bob = s.user("bob", &[]).await;
    let carol = s.user("carol", &[]).await;
    let vault = new_vault(&alice, false).await;
    let member = vaultfs::protocol::Member { user: "bob".into(), rights: Rights::Read, wrapped_key: None };
    alice.set_member(vault, member).await.unwrap();
    let start = bob.vaults().await.unwrap()[0].changes;
    let record = new_record(&alice, vault, None).await;
    let file = new_file(&alice, record).await;
    alice.upload(file, 1, true, None, UploadBody::from_bytes(&b"content"[..])).await.unwrap();
    let changes = bob.changes(vault, start).await.unwrap();
    assert_eq!(changes.records.iter().map(|r| r.id).collect::<Vec<_>>(), [record]);
    assert_eq!(changes.files.iter().map(|f| (f.id, f.version)).collect::<Vec<_>>(), [(file, 2)]);
    assert!(!changes.more);
    assert_eq!(changes.until, bob.vaults().await.unwrap()[0].changes);
    assert!(matches!(carol.changes(vault, start).await, Err(RemoteError::NotFound(_))), "not a member");
    assert!(matches!(bob.changes(vault, changes.until + 1).await, Err(RemoteError::Relist(_))), "ahead");

    // Pages, and malformed queries, through raw HTTP.
    let token = login_token(&s, "bob").await;
    let client = tls_client(&s);
    let get = |query: String| {
        client.get(format!("{}/v1/vaults/{vault}/changes?{query}", s.url)).bearer_auth(&token).send()
    };
    let page: vaultfs::protocol::Changes =
        get(format!("since={start}&limit=1")).await.unwrap().json().await.unwrap();
    assert!(page.more && page.records.len() + page.files.len() == 1 && page.until > start);
    let rest: vaultfs::protocol::Changes =
        get(format!("since={}&limit=1", page.until)).await.unwrap().json().await.unwrap();
    assert!(!rest.more && rest.records.len() + rest.files.len() == 1 && rest.until == changes.until);
    for (query, status) in [
        ("since=-1".to_string(), 400),
        ("since=abc".into(), 400),
        (String::new(), 400),
        (format!("since={start}&limit=0"), 400),
        (format!("since={start}&limit=1001"), 400),
        (format!("since={}", changes.until + 5), 410),
    ] {
        let resp = get(query.clone()).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{query}");
    }

    // The vault deleted: its feed is gone.
    alice.delete_file(file, 2).await.unwrap();
    alice.delete_record(record, 1).await.unwrap();
    let version = alice.vaults().await.unwrap()[0].version;
    delete_vault(&s, "alice", vault, version).await;
    assert!(matches!(bob.changes(vault, start).await, Err(RemoteError::NotFound(_))));
}

/// `who`'s wait for changes from `known` (and `wallet`), held at most 15 s,
/// with `change` made 200 ms into it: the answer, and how long it took.
async fn wait_across(
    who: &HttpRemote,
    known: &std::collections::BTreeMap<VaultId, u64>,
    wallet: Option<u64>,
    change: impl std::future::Future<Output = ()>,
) -> (vaultfs::protocol::VaultChanges, Duration) {
    let started = Instant::now();
    let (answer, ()) =
        tokio::join!(who.wait_for_changes(known.clone(), wallet, Duration::from_secs(15)), async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            change.await;
        });
    (answer.unwrap(), started.elapsed())
}

/// A wait for changes is held until one of the caller's vaults changes (or
/// is added), then answers at once with the new numbers; with nothing
/// changing it answers the same numbers after its timeout. A vault the caller
/// is not a member of never shows in the answer. The wallet's version is
/// watched when the caller names the one it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_changes_answers_when_a_vault_changes() {
    use std::collections::BTreeMap;
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let bob = s.user("bob", &[]).await;
    let vault = new_vault(&alice, false).await;
    let known: BTreeMap<VaultId, u64> =
        alice.vaults().await.unwrap().iter().map(|v| (v.id, v.changes)).collect();

    // Nothing changes: the same numbers after the timeout.
    let started = Instant::now();
    let same = alice.wait_for_changes(known.clone(), None, Duration::from_millis(300)).await.unwrap();
    assert_eq!(same.vaults, known);
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());

    // A change by another request ends the wait at once.
    let (now, took) = wait_across(&alice, &known, None, async {
        new_record(&alice, vault, None).await;
    })
    .await;
    assert!(now.vaults[&vault] > known[&vault], "{now:?}");
    assert!(took < Duration::from_secs(5), "answered when the vault changed, not at the timeout: {took:?}");

    // The wallet is watched when asked: storing it ends the wait at once,
    // with its new version.
    let version = alice.put_wallet(b"sealed wallet".to_vec(), None).await.unwrap();
    let current: BTreeMap<VaultId, u64> =
        alice.vaults().await.unwrap().iter().map(|v| (v.id, v.changes)).collect();
    let started = Instant::now();
    let same = alice.wait_for_changes(current.clone(), Some(version), Duration::from_millis(300)).await;
    assert_eq!(same.unwrap().wallet, Some(version));
    assert!(started.elapsed() >= Duration::from_millis(250), "nothing changed: held to the timeout");
    let (now, took) = wait_across(&alice, &current, Some(version), async {
        alice.put_wallet(b"sealed wallet, changed".to_vec(), Some(version)).await.unwrap();
    })
    .await;
    assert_eq!(now.wallet, Some(version + 1));
    assert!(took < Duration::from_secs(5), "answered when the wallet changed: {took:?}");

    // Bob is no member: he learns nothing of alice's vault, until she adds him.
    let his = bob.wait_for_changes(BTreeMap::new(), None, Duration::from_millis(200)).await.unwrap();
    assert!(his.vaults.is_empty());
    let asked = bob.wait_for_changes(known.clone(), None, Duration::from_secs(5)).await.unwrap();
    assert!(asked.vaults.is_empty(), "naming a vault he is not a member of shows him nothing: {asked:?}");
    let (his, _) = wait_across(&bob, &BTreeMap::new(), None, async {
        let member =
            vaultfs::protocol::Member { user: "bob".into(), rights: Rights::Read, wrapped_key: None };
        alice.set_member(vault, member).await.unwrap();
    })
    .await;
    assert_eq!(his.vaults.keys().copied().collect::<Vec<_>>(), [vault]);

    // At most eight waits at once per user: a ninth is refused at once.
    let known: BTreeMap<VaultId, u64> =
        alice.vaults().await.unwrap().iter().map(|v| (v.id, v.changes)).collect();
    let held = futures_util::future::join_all(
        (0..8).map(|_| alice.wait_for_changes(known.clone(), None, Duration::from_secs(2))),
    );
    let ninth = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        alice.wait_for_changes(known.clone(), None, Duration::from_secs(2)).await
    };
    let (held, ninth) = tokio::join!(held, ninth);
    assert!(held.iter().all(|r| r.as_ref().is_ok_and(|now| now.vaults == known)));
    assert!(matches!(ninth, Err(RemoteError::Refused(_))), "{ninth:?}");
    // Their slots are free again once they answered.
    assert!(alice.wait_for_changes(known.clone(), None, Duration::from_millis(100)).await.is_ok());

    // A vault deleted: its members' waits answer at once, without it.
    let records = alice.records(vault).await.unwrap();
    for r in records {
        alice.delete_record(r.id, r.version).await.unwrap();
    }
    let bobs: BTreeMap<VaultId, u64> =
        bob.vaults().await.unwrap().iter().map(|v| (v.id, v.changes)).collect();
    let version = alice.vaults().await.unwrap()[0].version;
    let (gone, took) = wait_across(&bob, &bobs, None, async {
        delete_vault(&s, "alice", vault, version).await;
    })
    .await;
    assert!(gone.vaults.is_empty() && took < Duration::from_secs(5), "{gone:?} after {took:?}");
}

/// Long ranges and whole reads come back byte for byte, whatever the backend
/// (on S3 a long read is fetched as several ranged GETs at once and given out
/// in order), and so do lengths around one part and no bytes at all (a whole
/// read on S3 starts with a ranged GET, which an empty object refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ranges_read_back_byte_for_byte() {
    let s = TestServer::start();
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    let len = 41 << 20;
    let data: Vec<u8> = (0..len as u64).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    alice.upload(file, 1, false, None, UploadBody::from_bytes(data.clone())).await.unwrap();
    for range in [3..len as u64 - 5, 17 << 20..len as u64, 8 << 20..(24 << 20) + 1, 5..6] {
        let got = read(&alice, file, Some(range.clone())).await.unwrap();
        assert!(got == data[range.start as usize..range.end as usize], "bytes {range:?}");
    }
    assert!(read(&alice, file, None).await.unwrap() == data);
    let cuts = [(8 << 20) - 1, 8 << 20, (8 << 20) + 1, (16 << 20) + 1, 1, 0];
    for (version, cut) in (2..).zip(cuts) {
        alice.upload(file, version, false, None, UploadBody::from_bytes(data[..cut].to_vec())).await.unwrap();
        assert!(read(&alice, file, None).await.unwrap() == data[..cut], "{cut} bytes");
    }
}

/// Readiness says whether to send this instance requests; a SIGTERM lets
/// an upload in flight finish and commit before the server exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_blob_store_and_a_shutdown_finishes_uploads_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = TestServer::start_in(&data, &[]);
    let client = tls_client(&s);
    let ready = |client: reqwest::Client, url: String| async move {
        let r = client.get(format!("{url}/v1/ready")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(ready(client.clone(), s.url.clone()).await, (200, r#"{"status":"ready"}"#.to_string()));
    {
        // The blob store gone (on S3, the bucket): not ready, and the
        // answer says which part.
        // (An answer is reused for a second: asked until it changes.)
        let until = |want: u16| {
            let (client, url) = (client.clone(), s.url.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let (status, body) = ready(client.clone(), url.clone()).await;
                    if status == want || Instant::now() > deadline {
                        return (status, body);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let store = s.store_dir();
        let away = store.with_extension("away");
        std::fs::rename(&store, &away).unwrap();
        let (status, body) = until(503).await;
        assert!(
            status == 503 && body.contains("not_ready") && body.contains("blob store"),
            "{status} {body}"
        );
        std::fs::rename(&away, &store).unwrap();
        assert_eq!(until(200).await.0, 200);
    }

    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    const PIECES: u32 = 40;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let body = futures_util::stream::unfold(0u32, move |n| {
        let counter = std::sync::Arc::clone(&counter);
        async move {
            if n == PIECES {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            counter.fetch_add(1 << 20, std::sync::atomic::Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(Bytes::from(vec![n as u8; 1 << 20])), n + 1))
        }
    });
    let upload = tokio::spawn(async move {
        let body = UploadBody {
            len: Some(u64::from(PIECES) << 20),
            stream: Box::pin(body),
            conflict_copy: None,
            meta: None,
        };
        alice.upload(file, 1, true, None, body).await
    });
    // A wait for changes held open, as every mount holds one: answered at
    // the shutdown, not at its end (it would hold the shutdown that long).
    let bob = s.user("bob", &[]).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let answer = bob.wait_for_changes(Default::default(), None, Duration::from_secs(15)).await;
        (answer, started.elapsed())
    });
    while sent.load(std::sync::atomic::Ordering::SeqCst) < 8 << 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = s.pid();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let result =
        tokio::time::timeout(Duration::from_secs(60), upload).await.expect("the upload hung").unwrap();
    assert!(sent.load(std::sync::atomic::Ordering::SeqCst) == u64::from(PIECES) << 20, "not sent whole");
    assert_eq!(result.expect("an upload in flight at the shutdown failed").version, 2);
    let (answer, took) = waiting.await.unwrap();
    assert!(answer.is_ok() && took < Duration::from_secs(8), "a wait held the shutdown: {took:?} {answer:?}");
    // It exits by itself once the upload is answered.
    let deadline = Instant::now() + Duration::from_secs(20);
    let exited = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
    };
    while !exited() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(exited(), "the server did not exit after its uploads finished");
    s.restart();
    let alice = HttpRemote::login(&s.access(), "alice", b"alice passphrase", support::server::TEST_KDF)
        .await
        .unwrap();
    let got = read(&alice, file, None).await.unwrap();
    let want: Vec<u8> = (0..PIECES).flat_map(|n| vec![n as u8; 1 << 20]).collect();
    assert!(got == want, "the upload finished during the shutdown was not kept whole");
}

/// Blobs no file points at are collected only when old enough to be no
/// upload's about to commit (here or on another instance sharing the
/// store): an old orphan goes at the next start, a young one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_orphans_older_than_any_upload_are_collected() {
    if support::server::s3_mode() {
        // Orphans are made here as files with an old time; s3s-fs lists
        // only the objects stored through it (seen: files put in its
        // bucket directory were not listed).
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut s = TestServer::start_in(&dir.path().join("data"), &[]);
    let alice = s.user("alice", &[]).await;
    let vault = new_vault(&alice, false).await;
    let file = new_file(&alice, new_record(&alice, vault, None).await).await;
    alice.upload(file, 1, true, None, UploadBody::from_bytes(b"kept".to_vec())).await.unwrap();
    let (old, young) = ("0".repeat(32), "1".repeat(32));
    for (hex, age) in [(&old, 2 * 3600), (&young, 60)] {
        let path = s.blob_file(hex);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"an upload's blob, never committed").unwrap();
        let then = std::time::SystemTime::now() - Duration::from_secs(age);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(then).unwrap();
    }
    assert_eq!(s.stored_blobs().len(), 3);
    s.restart();
    let left: Vec<String> =
        s.stored_blobs().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&old), "the old orphan stayed: {left:?}");
    assert!(left.contains(&young), "a young blob (an upload about to commit?) was taken: {left:?}");
    let alice = HttpRemote::login(&s.access(), "alice", b"alice passphrase", support::server::TEST_KDF)
        .await
        .unwrap();
    assert_eq!(read(&alice, file, None).await.unwrap(), b"kept");
}
