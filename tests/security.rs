//! A member with another cluster secret, another CA, or another cluster name cannot join,
//! gossip or call, and both sides log why.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use grid::{Grid, NetError};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use common::{capture_logs, eventually, member};

/// Checks that `a` and `b` never see each other for `watch`, and that `b` cannot call `a`.
async fn stay_apart(a: &Grid, b: &Grid) -> NetError {
    assert!(
        !a.cluster()
            .wait_until(Duration::from_millis(1500), |m| m.len() > 1)
            .await,
        "{:?}",
        a.cluster().members()
    );
    assert_eq!(b.cluster().members().len(), 1);
    b.transport()
        .request(a.addr(), "grid.leave", b"", Duration::from_secs(3))
        .await
        .expect_err("a stranger cannot call")
}

#[tokio::test(flavor = "current_thread")]
async fn another_secret_cannot_join_and_both_sides_log_why() {
    let logs = capture_logs();
    let a = member("sec", "a").secret("right").start().await.unwrap();
    let b = member("sec", "b")
        .secret("wrong")
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    let err = stay_apart(&a, &b).await;
    assert!(
        err.to_string().contains("certificate not accepted"),
        "{err}"
    );
    let text = logs.lines_with(&[a.addr().to_string(), b.addr().to_string()]);
    assert!(
        text.contains("refused incoming connection: certificate not accepted"),
        "{text}"
    );
    assert!(
        text.contains("cannot connect: certificate not accepted"),
        "{text}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn another_cluster_name_cannot_join_and_both_sides_log_why() {
    let logs = capture_logs();
    let a = member("name-a", "a").secret("same").start().await.unwrap();
    let b = member("name-b", "b")
        .secret("same")
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    let err = stay_apart(&a, &b).await;
    assert!(
        matches!(err, NetError::Refused { .. } | NetError::Unreachable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("wrong cluster name"), "{err}");
    let text = logs.lines_with(&[a.addr().to_string(), b.addr().to_string()]);
    assert!(text.contains("refusing member"), "{text}");
    assert!(text.contains("peer refused this member"), "{text}");
    assert!(text.contains("wrong cluster name"), "{text}");
    a.shutdown().await;
    b.shutdown().await;
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// Writes ca.pem, NAME.pem and NAME.key for a member certificate signed by `ca`.
fn member_files(dir: &Path, ca: &Ca, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![format!("{name}.example")]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca.cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "current_thread")]
async fn members_of_one_ca_join_and_a_member_of_another_ca_cannot() {
    let logs = capture_logs();
    let dir = std::env::temp_dir().join(format!(
        "grid-tls-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = new_ca("cluster CA");
    let other_ca = new_ca("another CA");
    let (ca_a, cert_a, key_a) = member_files(&dir, &ca, "a");
    let (ca_b, cert_b, key_b) = member_files(&dir, &ca, "b");
    let (ca_c, cert_c, key_c) = member_files(&dir, &other_ca, "c");

    let a = member("pem", "a")
        .tls_files(ca_a, cert_a, key_a)
        .start()
        .await
        .unwrap();
    let b = member("pem", "b")
        .tls_files(ca_b, cert_b, key_b)
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    assert!(
        a.cluster()
            .wait_until(Duration::from_secs(10), |m| m.len() == 2)
            .await,
        "members with certificates of one CA form a cluster"
    );
    let c = member("pem", "c")
        .tls_files(ca_c, cert_c, key_c)
        .seed(a.addr())
        .start()
        .await
        .unwrap();
    assert!(
        !a.cluster()
            .wait_until(Duration::from_millis(1500), |m| m.len() > 2)
            .await,
        "a member of another CA must not join"
    );
    assert_eq!(c.cluster().members().len(), 1);
    assert!(c
        .transport()
        .request(a.addr(), "grid.leave", b"", Duration::from_secs(3))
        .await
        .is_err());
    let ours = [a.addr().to_string(), c.addr().to_string()];
    assert!(
        eventually(Duration::from_secs(3), || logs
            .lines_with(&ours)
            .contains("refused incoming connection"))
        .await,
        "{}",
        logs.lines_with(&ours)
    );
    assert!(
        logs.lines_with(&ours)
            .contains("cannot connect: certificate not accepted"),
        "{}",
        logs.lines_with(&ours)
    );
    for g in [&a, &b, &c] {
        g.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
