use super::*;
use crate::testing::{TestRedis, eventually, labeled, trajectory, unique};
use std::collections::BTreeSet;

fn config(url: &str) -> Config {
    Config { url: url.into(), batch: 16, block_ms: 100, ..Config::default() }
}

async fn drain<T: Entry>(c: &mut Consumer<T>, cfg: &Config, want: usize) -> Vec<T> {
    let mut got = Vec::new();
    eventually("entries to arrive", Duration::from_secs(20), async || {
        let batch = c.recv(cfg).await.unwrap();
        let entries: Vec<String> = batch.items.iter().map(|d| d.entry.clone()).collect();
        got.extend(batch.items.into_iter().map(|d| d.item));
        c.ack(&entries).await.unwrap();
        (got.len() >= want).then_some(())
    })
    .await;
    got
}

#[test]
fn redact_url_hides_passwords_only() {
    assert_eq!(redact_url("redis://:s3cret@host:6379/0"), "redis://:***@host:6379/0");
    assert_eq!(redact_url("rediss://user:s3cret@host:6380"), "rediss://user:***@host:6380");
    assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    assert_eq!(redact_url("unix:///run/redis.sock"), "unix:///run/redis.sock");
}

#[test]
fn config_refuses_a_batch_larger_than_the_cap() {
    let c = Config { max_len: 8, batch: 9, ..Config::default() };
    assert_eq!(c.validate().unwrap_err().key, "redis.batch");
    let c = Config { url: "http://:pw@x".into(), ..Config::default() };
    let e = c.validate().unwrap_err();
    assert!(!e.to_string().contains("pw"), "{e}");
    Config::default().validate().unwrap();
}

#[tokio::test]
async fn two_consumers_of_a_group_share_the_entries_exactly_once() {
    let server = TestRedis::shared();
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("share"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut a = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "a", None).await.unwrap();
    let mut b = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "b", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    let sent: Vec<Trajectory> = (0..100).map(|i| trajectory(i, 32)).collect();
    p.send(&sent, &cfg).await.unwrap();

    let mut seen = Vec::new();
    eventually("all 100 entries", Duration::from_secs(20), async || {
        for c in [&mut a, &mut b] {
            let batch = c.recv(&cfg).await.unwrap();
            let entries: Vec<String> = batch.items.iter().map(|d| d.entry.clone()).collect();
            seen.extend(batch.items.into_iter().map(|d| d.item));
            c.ack(&entries).await.unwrap();
        }
        (seen.len() >= 100).then_some(())
    })
    .await;
    assert_eq!(seen.len(), 100, "no entry delivered twice");
    let ids: BTreeSet<u64> = seen.iter().map(|t| t.id.0).collect();
    assert_eq!(ids, (0..100).collect());
    assert_eq!(seen.iter().find(|t| t.id.0 == 42), Some(&sent[42]), "the trajectory arrives intact");
    let depth = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!((depth.waiting, depth.pending), (0, 0), "acknowledged entries are deleted");
}

#[tokio::test]
async fn a_full_stream_makes_the_producer_wait_and_loses_nothing() {
    let server = TestRedis::shared();
    let cfg = Config { max_len: 10, batch: 4, ..config(&server.url) };
    let keys = RunKeys::new("prism", &unique("cap"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut c = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "c", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    let producer_cfg = cfg.clone();
    let producer = tokio::spawn(async move {
        let items: Vec<Trajectory> = (0..25).map(|i| trajectory(i, 8)).collect();
        p.send(&items, &producer_cfg).await.unwrap();
        p.backpressure_waits()
    });
    let full = eventually("the stream to fill up", Duration::from_secs(10), async || {
        let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
        (d.waiting == 10).then_some(d)
    })
    .await;
    assert_eq!(full.waiting, 10);
    assert!(!producer.is_finished(), "the producer waits at the cap");
    let got = drain(&mut c, &cfg, 25).await;
    let waits = producer.await.unwrap();
    assert!(waits > 0);
    let ids: Vec<u64> = got.iter().map(|t| t.id.0).collect();
    assert_eq!(ids, (0..25).collect::<Vec<_>>(), "all entries, in order, none trimmed");
}

#[tokio::test]
async fn entries_of_a_consumer_that_stopped_acknowledging_are_reclaimed() {
    let server = TestRedis::shared();
    let cfg = Config { claim_idle_ms: 300, ..config(&server.url) };
    let keys = RunKeys::new("prism", &unique("claim"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut stuck = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "stuck", None).await.unwrap();
    let mut alive = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "alive", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    p.send(&(0..5).map(|i| trajectory(i, 8)).collect::<Vec<_>>(), &cfg).await.unwrap();
    let taken = stuck.recv(&cfg).await.unwrap();
    assert_eq!(taken.items.len(), 5);
    // `stuck` never acknowledges; `alive` gets them once they have been idle 300 ms.
    let reclaimed = eventually("reclaim", Duration::from_secs(10), async || {
        let b = alive.recv(&cfg).await.unwrap();
        (!b.items.is_empty()).then_some(b)
    })
    .await;
    assert!(reclaimed.items.iter().all(|d| d.reclaimed));
    let ids: Vec<u64> = reclaimed.items.iter().map(|d| d.item.id.0).collect();
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn a_dead_workers_entries_are_taken_over_at_once() {
    let server = TestRedis::shared();
    let cfg = config(&server.url); // claim_idle_ms stays at 60 s
    let keys = RunKeys::new("prism", &unique("dead"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut dead = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "reward-1", None).await.unwrap();
    let mut alive = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "reward-2", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    p.send(&(0..3).map(|i| trajectory(i, 8)).collect::<Vec<_>>(), &cfg).await.unwrap();
    assert_eq!(dead.recv(&cfg).await.unwrap().items.len(), 3);
    drop(dead);
    let b = alive.claim_from("reward-1", &cfg).await.unwrap();
    assert_eq!(b.items.iter().map(|d| d.item.id.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(b.items.iter().all(|d| d.reclaimed));
    // and nothing is left pending for anyone
    alive.ack(&b.items.iter().map(|d| d.entry.clone()).collect::<Vec<_>>()).await.unwrap();
    let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 0));
}

#[tokio::test]
async fn the_learner_ingests_a_trajectory_id_once() {
    let server = TestRedis::shared();
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("dedup"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut learner = redis.consumer::<LabeledTrajectory>(&keys.labeled, LEARNER_GROUP, "learner", Some(&keys.ingested)).await.unwrap();
    let mut p = redis.producer::<LabeledTrajectory>(&keys.labeled).await.unwrap();
    // trajectory 1 labeled twice (its reward worker died before acknowledging it)
    let big = 1u64 << 40;
    p.send(&[labeled(1, 8), labeled(2, 8), labeled(1, 8), labeled(3, 8), labeled(big, 8), labeled(big, 8)], &cfg).await.unwrap();
    let got = drain(&mut learner, &cfg, 4).await;
    assert_eq!(got.iter().map(|l| l.trajectory.id.0).collect::<Vec<_>>(), vec![1, 2, 3, big]);
    assert_eq!(learner.duplicates(), 2);
    // a second learner consumer (a restarted learner) does not ingest them again either
    p.send(&[labeled(2, 8)], &cfg).await.unwrap();
    let mut again = redis.consumer::<LabeledTrajectory>(&keys.labeled, LEARNER_GROUP, "learner-2", Some(&keys.ingested)).await.unwrap();
    let b = eventually("the duplicate", Duration::from_secs(10), async || {
        let b = again.recv(&cfg).await.unwrap();
        (b.duplicates > 0).then_some(b)
    })
    .await;
    assert!(b.items.is_empty());
}

#[tokio::test]
async fn an_undecodable_entry_is_dropped_with_its_reason() {
    let server = TestRedis::shared();
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("bad"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut c = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "c", None).await.unwrap();
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("XADD").arg(&keys.sampled).arg("*").arg("id").arg(9).arg("p").arg(&[0xffu8, 0xff][..]).query_async(&mut conn).await.unwrap();
    let b = eventually("the bad entry", Duration::from_secs(10), async || {
        let b = c.recv(&cfg).await.unwrap();
        (!b.dropped.is_empty()).then_some(b)
    })
    .await;
    assert!(b.dropped[0].reason.contains("cannot decode"), "{:?}", b.dropped);
    let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 0), "a dropped entry is acknowledged");
}

#[tokio::test]
async fn workers_reconnect_after_a_redis_restart_with_aof() {
    let mut server = TestRedis::private(&["--appendonly", "yes", "--appendfsync", "always"]);
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("restart"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut c = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "c", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    p.send(&(0..5).map(|i| trajectory(i, 8)).collect::<Vec<_>>(), &cfg).await.unwrap();
    let first = drain(&mut c, &cfg, 2).await; // some read (and acknowledged) before the crash
    server.kill();
    // while Redis is down the producer keeps retrying
    let producer_cfg = cfg.clone();
    let producer = tokio::spawn(async move {
        p.send(&(5..10).map(|i| trajectory(i, 8)).collect::<Vec<_>>(), &producer_cfg).await.map(|_| p)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.start(&["--appendonly", "yes", "--appendfsync", "always"]);
    producer.await.unwrap().unwrap();
    let rest = drain(&mut c, &cfg, 10 - first.len()).await;
    let mut ids: Vec<u64> = first.iter().chain(&rest).map(|t| t.id.0).collect();
    ids.sort();
    assert_eq!(ids, (0..10).collect::<Vec<_>>(), "nothing lost, nothing twice across the restart");
}

#[tokio::test]
async fn a_password_from_the_environment_is_used_and_never_shown() {
    let server = TestRedis::private(&["--requirepass", "hunter2-secret"]);
    let var = unique("PW").replace('-', "_");
    let cfg = Config { password_env: var.clone(), ..config(&server.url) };
    let err = Redis::connect(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("NOAUTH") || err.to_lowercase().contains("auth"), "{err}");
    // SAFETY: the variable name is unique to this test.
    unsafe { std::env::set_var(&var, "hunter2-secret") };
    let redis = Redis::connect(&cfg).await.unwrap();
    assert!(!format!("{redis:?}").contains("hunter2"));
    let cfg = Config { url: format!("redis://:wrong-pw@127.0.0.1:{}", server.port), password_env: "PRISM_NO_SUCH_VAR".into(), ..cfg };
    let err = Redis::connect(&cfg).await.unwrap_err().to_string();
    assert!(!err.contains("wrong-pw") && err.contains(":***@"), "{err}");
}

/// A resumed run reads its URL from the run folder's config.toml, where the
/// password is `***`: that is refused, saying where the real one goes (it
/// was sent as the password); a password file or the environment wins over it.
#[tokio::test]
async fn a_redacted_password_is_refused_saying_where_the_real_one_goes() {
    let server = TestRedis::private(&["--requirepass", "hunter3-secret"]);
    let var = unique("PW").replace('-', "_");
    let cfg = Config { url: format!("redis://:***@127.0.0.1:{}", server.port), password_env: var.clone(), ..config(&server.url) };
    let err = Redis::connect(&cfg).await.unwrap_err().to_string();
    assert!(err.contains("redacted") && err.contains(&var), "{err}");
    // A password file (a mounted Secret) wins, and one that cannot be read is named.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "hunter3-secret\n").unwrap();
    Redis::connect(&Config { password_file: file.display().to_string(), ..cfg.clone() }).await.unwrap();
    let missing = dir.path().join("missing").display().to_string();
    let err = Redis::connect(&Config { password_file: missing.clone(), ..cfg.clone() }).await.unwrap_err().to_string();
    assert!(err.contains("redis.password_file") && err.contains(&missing), "{err}");
    // SAFETY: the variable name is unique to this test.
    unsafe { std::env::set_var(&var, "hunter3-secret") };
    Redis::connect(&cfg).await.unwrap();
}

#[tokio::test]
async fn rediss_urls_use_tls_with_a_private_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let port = crate::testing::free_port();
    let (c, k) = (cert_path.display().to_string(), key_path.display().to_string());
    let args = ["--port", "0", "--tls-port", &port.to_string(), "--tls-cert-file", &c, "--tls-key-file", &k, "--tls-auth-clients", "no"];
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(crate::testing::redis_server(dir.path(), port, &args));
    crate::testing::wait_for_port(port);
    let cfg = Config { url: format!("rediss://localhost:{port}"), tls_ca_file: c.clone(), ..config("") };
    let redis = Redis::connect(&cfg).await.unwrap();
    let keys = RunKeys::new("prism", &unique("tls"));
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    p.send(&[trajectory(1, 8)], &cfg).await.unwrap();
    assert_eq!(redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap().waiting, 1);
    // without the CA the server's certificate is not trusted
    let err = Redis::connect(&Config { tls_ca_file: String::new(), connect_timeout_ms: 2000, retry_for_ms: 1, ..cfg.clone() }).await.unwrap_err();
    assert!(matches!(err, Error::RedisUnreachable { .. }), "{err}");
    // plaintext to the TLS port does not get through either
    let err = Redis::connect(&Config { url: format!("redis://localhost:{port}"), connect_timeout_ms: 1000, ..cfg }).await;
    assert!(err.is_err());
}

#[tokio::test]
async fn groups_in_lists_what_a_stream_still_holds_by_group() {
    let server = TestRedis::shared();
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("groups"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut c = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "c", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    // 1100 entries: more than one XRANGE page of 512
    let sent: Vec<Trajectory> = (0..1100).map(|i| trajectory(i, 4)).collect();
    p.send(&sent, &cfg).await.unwrap();
    let (groups, bad) = redis.groups_in::<Trajectory>(&keys.sampled).await.unwrap();
    assert_eq!(bad, 0);
    let count: usize = groups.values().map(|ids| ids.len()).sum();
    assert_eq!(count, 1100);
    let g = sent[17].group.0;
    let want: BTreeSet<u64> = sent.iter().filter(|t| t.group.0 == g).map(|t| t.id.0).collect();
    assert_eq!(groups[&g].iter().copied().collect::<BTreeSet<u64>>(), want);
    // acknowledged (and so deleted) entries are no longer listed
    let got = drain(&mut c, &cfg, 1100).await;
    assert_eq!(got.len(), 1100);
    let (groups, _) = redis.groups_in::<Trajectory>(&keys.sampled).await.unwrap();
    assert!(groups.is_empty(), "{} groups left", groups.len());
}

/// The judged stream is a broadcast: every subscriber reads every other
/// sender's entry from where it stood when made, none its own; the stream
/// keeps the newest `max_len` entries; a fresh run deletes it.
#[tokio::test]
async fn every_subscriber_reads_every_other_senders_broadcast_and_a_reset_clears_them() {
    let server = TestRedis::shared();
    let cfg = Config { max_len: 8, batch: 4, ..config(&server.url) };
    let keys = RunKeys::new("prism", &unique("broadcast"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut conn = redis::Client::open(server.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut a = redis.publisher(&keys.judged, "reward-1").await.unwrap();
    a.publish(b"before", &cfg).await.unwrap();
    // Subscribers read what is added after they start.
    let mut subs = [redis.subscriber(&keys.judged, "reward-1").await.unwrap(), redis.subscriber(&keys.judged, "reward-2").await.unwrap()];
    let mut b = redis.publisher(&keys.judged, "reward-2").await.unwrap();
    for i in 0..3 {
        a.publish(format!("a{i}").as_bytes(), &cfg).await.unwrap();
        b.publish(format!("b{i}").as_bytes(), &cfg).await.unwrap();
    }
    let mut got: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    for (sub, got) in subs.iter_mut().zip(&mut got) {
        eventually("3 entries of the other sender", Duration::from_secs(10), async || {
            let r = sub.recv(&cfg).await.unwrap();
            got.extend(r.items.iter().map(|e| String::from_utf8(e.payload.clone()).unwrap()));
            (got.len() >= 3).then_some(())
        })
        .await;
    }
    assert_eq!(got, vec![vec!["b0", "b1", "b2"], vec!["a0", "a1", "a2"]]);
    assert_eq!((subs[0].own(), subs[1].own(), subs[0].dropped()), (3, 3, 0));
    // 7 entries so far; 3 more, and the oldest 2 are trimmed.
    for i in 3..6 {
        a.publish(format!("a{i}").as_bytes(), &cfg).await.unwrap();
    }
    let len: u64 = redis::cmd("XLEN").arg(&keys.judged).query_async(&mut conn).await.unwrap();
    assert_eq!(len, 8, "capped at redis.max_len entries");
    redis.reset_run(&keys).await.unwrap();
    let len: u64 = redis::cmd("XLEN").arg(&keys.judged).query_async(&mut conn).await.unwrap();
    assert_eq!(len, 0, "a fresh run starts without them");
}

/// The learner holds two members of a group, waiting for the other two,
/// longer than `redis.claim_idle_ms`: it never takes its own entries back
/// (before, it reclaimed them, found their ids ingested and deleted them from
/// the stream while still holding them), and the group completes once.
#[tokio::test]
async fn the_learner_never_takes_back_entries_it_holds_past_claim_idle() {
    use crate::assembly::{Assembled, Assembler};
    use prism_core::LabelResult;
    let server = TestRedis::shared();
    let cfg = Config { claim_idle_ms: 200, ..config(&server.url) };
    let keys = RunKeys::new("prism", &unique("held"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut assembler = Assembler::new(&redis, &keys, "learner").await.unwrap();
    let mut p = redis.producer::<LabelResult>(&keys.labeled).await.unwrap();
    p.send(&[Ok(labeled(0, 8)), Ok(labeled(1, 8))], &cfg).await.unwrap();
    eventually("two members held", Duration::from_secs(10), async || {
        assert!(assembler.next(&cfg).await.unwrap().is_empty());
        (assembler.partial_groups() == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        assert!(assembler.next(&cfg).await.unwrap().is_empty());
    }
    assert_eq!(assembler.duplicates(), 0, "nothing came back as a duplicate");
    let d = redis.depth(&keys.labeled, LEARNER_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 2), "the held entries are still in the stream");
    p.send(&[Ok(labeled(2, 8)), Ok(labeled(3, 8))], &cfg).await.unwrap();
    let done = eventually("the group", Duration::from_secs(10), async || {
        let out = assembler.next(&cfg).await.unwrap();
        (!out.is_empty()).then_some(out)
    })
    .await;
    let [Assembled::Complete { trajectories, entries, .. }] = &done[..] else { panic!("{done:?}") };
    assert_eq!(trajectories.iter().map(|l| l.trajectory.sample).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(entries.len(), 4);
    assembler.ack(entries).await.unwrap();
    let d = redis.depth(&keys.labeled, LEARNER_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 0));
}

/// A worker refreshing the entries it works on keeps them from another
/// consumer past `claim_idle_ms`; entries it no longer holds are not taken back.
#[tokio::test]
async fn entries_kept_in_hand_are_not_reclaimed() {
    let server = TestRedis::shared();
    let cfg = Config { claim_idle_ms: 300, ..config(&server.url) };
    let keys = RunKeys::new("prism", &unique("keep"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut busy = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "busy", None).await.unwrap();
    let mut other = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "other", None).await.unwrap();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    p.send(&(0..3).map(|i| trajectory(i, 8)).collect::<Vec<_>>(), &cfg).await.unwrap();
    let held: Vec<String> = busy.recv(&cfg).await.unwrap().items.into_iter().map(|d| d.entry).collect();
    assert_eq!(held.len(), 3);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(busy.keep(&held).await.unwrap(), 3);
        assert!(other.recv(&cfg).await.unwrap().items.is_empty(), "nothing taken over while kept");
    }
    // Once it stops, they go idle and `other` takes them over; `busy` no
    // longer holds them, and keeping them does not take them back.
    let taken = eventually("the takeover", Duration::from_secs(10), async || {
        let b = other.recv(&cfg).await.unwrap();
        (!b.items.is_empty()).then_some(b)
    })
    .await;
    assert_eq!(taken.items.len(), 3);
    assert_eq!(busy.keep(&held).await.unwrap(), 0);
    let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!(d.pending, 3);
}

/// With the run's token, a consumer takes only entries sealed with it: a
/// valid payload added without a tag, with a wrong tag, by a process with
/// another token, with a tag made for another stream, or with an id field
/// that disagrees with its payload is dropped with its reason, and
/// acknowledged. A subscriber to a broadcast stream drops unsealed entries too.
#[tokio::test]
async fn with_a_token_only_entries_sealed_with_it_get_through() {
    use crate::grpc::Token;
    let server = TestRedis::shared();
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("seal"));
    let seal = Seal::new(&Token::new("run-token").unwrap());
    let redis = Redis::connect(&cfg).await.unwrap().sealed(Some(seal.clone()));
    let mut c = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "c", None).await.unwrap();
    redis.producer::<Trajectory>(&keys.sampled).await.unwrap().send(&[trajectory(1, 8)], &cfg).await.unwrap();
    let add = |id: u64, fields: Vec<(&'static str, Vec<u8>)>| {
        let (url, stream) = (server.url.clone(), keys.sampled.clone());
        async move {
            let mut all = vec![("id", id.to_string().into_bytes())];
            all.extend(fields);
            let refs: Vec<(&str, &[u8])> = all.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            crate::testing::xadd(&url, &stream, &refs).await;
        }
    };
    let p = |id| trajectory(id, 8).encode();
    add(2, vec![("p", p(2))]).await;
    add(3, vec![("p", p(3)), ("m", vec![0; crate::redis::seal::TAG_BYTES])]).await;
    let other = Redis::connect(&cfg).await.unwrap().sealed(Some(Seal::new(&Token::new("another-token").unwrap())));
    other.producer::<Trajectory>(&keys.sampled).await.unwrap().send(&[trajectory(4, 8)], &cfg).await.unwrap();
    add(5, vec![("p", p(5)), ("m", seal.tag(&keys.labeled, b"5", &p(5)))]).await;
    add(6, vec![("p", p(7)), ("m", seal.tag(&keys.sampled, b"6", &p(7)))]).await;
    let (mut got, mut dropped) = (Vec::new(), Vec::new());
    eventually("every entry read", Duration::from_secs(10), async || {
        let b = c.recv(&cfg).await.unwrap();
        c.ack(&b.items.iter().map(|d| d.entry.clone()).collect::<Vec<_>>()).await.unwrap();
        got.extend(b.items.into_iter().map(|d| d.item.id.0));
        dropped.extend(b.dropped);
        (got.len() + dropped.len() >= 6).then_some(())
    })
    .await;
    assert_eq!(got, vec![1]);
    assert_eq!(dropped.len(), 5, "{dropped:?}");
    assert_eq!(dropped.iter().filter(|d| d.reason.contains("not sealed with the run's token")).count(), 4, "{dropped:?}");
    assert!(dropped[4].reason.contains("id field disagrees"), "{dropped:?}");
    let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 0), "dropped entries are acknowledged");
    // Without a seal the consumer does not check (a run without a token).
    let plain = Redis::connect(&cfg).await.unwrap();
    let (n, bad) = plain.groups_in::<Trajectory>(&keys.labeled).await.unwrap();
    assert_eq!((n.len(), bad), (0, 0));

    let mut sub = redis.subscriber(&keys.judged, "a").await.unwrap();
    plain.publisher(&keys.judged, "b").await.unwrap().publish(b"forged", &cfg).await.unwrap();
    redis.publisher(&keys.judged, "c").await.unwrap().publish(b"sealed", &cfg).await.unwrap();
    let (mut items, mut skipped) = (Vec::new(), 0);
    eventually("both broadcasts", Duration::from_secs(10), async || {
        let b = sub.recv(&cfg).await.unwrap();
        skipped += b.dropped.len();
        items.extend(b.items.into_iter().map(|i| (i.sender, i.payload)));
        (items.len() + skipped >= 2).then_some(())
    })
    .await;
    assert_eq!(items, vec![("c".to_string(), b"sealed".to_vec())]);
    assert_eq!(skipped, 1);
}

/// The Redis users the Kubernetes manifests ship (k8s/base/redis-users.acl,
/// rendered as redis.yaml renders it): every role's operations go through as
/// its own user; a rollout cannot add labels, a reward cannot touch the
/// learner's keys, a client without a user can do nothing.
#[tokio::test]
async fn each_role_does_its_work_as_its_redis_user_and_no_more() {
    use crate::assembly::Assembler;
    use prism_core::LabelResult;
    let template = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/base/redis-users.acl")).unwrap();
    let rendered: String = template
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.replace("@LEARNER@", "learner-pw").replace("@ROLLOUT@", "rollout-pw").replace("@REWARD@", "reward-pw") + "\n")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("users.acl");
    std::fs::write(&acl, rendered).unwrap();
    let server = TestRedis::private(&["--aclfile", acl.to_str().unwrap()]);
    let as_user = async |user: &str| {
        let cfg = Config { url: format!("redis://{user}:{user}-pw@127.0.0.1:{}", server.port), retry_for_ms: 1000, ..config(&server.url) };
        (Redis::connect(&cfg).await.unwrap(), cfg)
    };
    let keys = RunKeys::new("prism", &unique("acl"));
    let (learner, cfg) = as_user("learner").await;
    let (rollout, _) = as_user("rollout").await;
    let (reward, _) = as_user("reward").await;
    let denied = |e: Error| {
        let text = e.to_string();
        assert!(text.to_uppercase().contains("NOPERM"), "{text}");
    };

    // The learner starts a run.
    learner.reset_run(&keys).await.unwrap();
    learner.reserve_issued(&keys, 4096).await.unwrap();
    assert_eq!(learner.issued_below(&keys).await.unwrap(), 4096);
    let mut assembler = Assembler::new(&learner, &keys, "learner").await.unwrap();
    // A rollout adds a group to the sampled stream, and nothing elsewhere.
    rollout.producer::<Trajectory>(&keys.sampled).await.unwrap().send(&(0..4).map(|i| trajectory(i, 8)).collect::<Vec<_>>(), &cfg).await.unwrap();
    denied(rollout.producer::<LabelResult>(&keys.labeled).await.unwrap().send(&[Ok(labeled(9, 8))], &cfg).await.unwrap_err());
    denied(rollout.reset_run(&keys).await.unwrap_err());
    // A reward worker labels it, keeps and takes over entries, shares judged steps.
    let mut c = reward.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "reward-1", None).await.unwrap();
    let got = drain_deliveries(&mut c, &cfg, 4).await;
    assert_eq!(c.keep(&got).await.unwrap(), 4);
    reward.producer::<LabelResult>(&keys.labeled).await.unwrap().send(&(0..4).map(|i| Ok(labeled(i, 8))).collect::<Vec<_>>(), &cfg).await.unwrap();
    c.ack(&got).await.unwrap();
    assert!(c.claim_from("reward-0", &cfg).await.unwrap().items.is_empty());
    reward.publisher(&keys.judged, "reward-1").await.unwrap().publish(b"steps", &cfg).await.unwrap();
    reward.subscriber(&keys.judged, "reward-2").await.unwrap();
    denied(reward.reset_run(&keys).await.unwrap_err());
    denied(reward.reserve_issued(&keys, 1 << 40).await.unwrap_err());
    // The learner ingests the group and accounts for the streams.
    let done = eventually("the group", Duration::from_secs(10), async || {
        let out = assembler.next(&cfg).await.unwrap();
        (!out.is_empty()).then_some(out)
    })
    .await;
    let crate::assembly::Assembled::Complete { entries, .. } = &done[0] else { panic!("{done:?}") };
    assembler.ack(entries).await.unwrap();
    learner.depth(&keys.labeled, LEARNER_GROUP).await.unwrap();
    learner.groups_in::<Trajectory>(&keys.sampled).await.unwrap();
    assert_eq!(learner.clear_streams(&keys).await.unwrap(), (0, 0));
    // Without a user: nothing.
    let anonymous = Config { url: server.url.clone(), retry_for_ms: 1000, ..config(&server.url) };
    let err = Redis::connect(&anonymous).await.unwrap_err().to_string();
    assert!(err.contains("NOAUTH") || err.contains("auth"), "{err}");
}

/// The entry ids of `want` deliveries (not acknowledged).
async fn drain_deliveries<T: Entry>(c: &mut Consumer<T>, cfg: &Config, want: usize) -> Vec<String> {
    let mut got = Vec::new();
    eventually("entries to arrive", Duration::from_secs(20), async || {
        got.extend(c.recv(cfg).await.unwrap().items.into_iter().map(|d| d.entry));
        (got.len() >= want).then_some(())
    })
    .await;
    got
}

/// Redis handed a consumer that takes nothing back from idle (the learner)
/// entries whose reply it never got (the connection dropped with the reply;
/// here: read for it by another connection, then its connection killed):
/// after its read is retried it reads its own pending entries again and
/// delivers those it was never handed, once. (Before, they stayed pending
/// to it forever: their groups never completed, and a distributed run
/// stalled after a Redis restart until `dist.group_timeout_ms`.)
#[tokio::test]
async fn entries_handed_over_with_a_lost_reply_are_delivered_after_a_dropped_connection() {
    let server = TestRedis::private(&[]);
    let cfg = config(&server.url);
    let keys = RunKeys::new("prism", &unique("lost-reply"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut c = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "learner", None).await.unwrap().without_reclaim();
    let mut p = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    p.send(&[trajectory(0, 8)], &cfg).await.unwrap();
    // Held, not acknowledged (a member waiting for its group).
    let held = eventually("the first entry", Duration::from_secs(20), async || {
        let batch = c.recv(&cfg).await.unwrap();
        (!batch.items.is_empty()).then_some(batch.items)
    })
    .await;
    assert_eq!(held.iter().map(|d| d.item.id.0).collect::<Vec<_>>(), vec![0]);
    p.send(&[trajectory(1, 8), trajectory(2, 8)], &cfg).await.unwrap();
    // Handed to "learner", the reply lost.
    let client = redis::Client::open(server.url.as_str()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP").arg("GROUP").arg(REWARD_GROUP).arg("learner").arg("STREAMS").arg(&keys.sampled).arg(">").query_async(&mut raw).await.unwrap();
    // Its connection drops: the next read fails once and is retried.
    let _: redis::Value = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").arg("SKIPME").arg("yes").query_async(&mut raw).await.unwrap();
    let rest = drain(&mut c, &cfg, 2).await;
    let mut ids: Vec<u64> = rest.iter().map(|t| t.id.0).collect();
    ids.sort();
    assert_eq!(ids, vec![1, 2], "the entries whose reply was lost");
    // Nothing comes twice: not the entry it holds (0), not these.
    let _: redis::Value = redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("normal").arg("SKIPME").arg("yes").query_async(&mut raw).await.unwrap();
    for _ in 0..3 {
        assert!(c.recv(&cfg).await.unwrap().items.is_empty());
    }
    let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 1), "the held entry is still pending");
}
