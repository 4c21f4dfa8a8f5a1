//! The provisioner job queue on a real (SQLite) store: a claim takes the oldest job a provisioner can run,
//! once, and bumps the epoch; renewals and completion need the current epoch; completion is idempotent; an
//! expired lease re-queues the job and fences its old holder; cancellation reaches the holder on renewal; a
//! job no live provisioner can take says why.

use std::collections::BTreeMap;

use controllers::jobs::{self, JobError, Outcome, Phase, ProvisionerInfo, Provisioners};
use model::kinds::{ProvisionerJobSpec, ProvisionerType};
use model::{Kind, ObjectMeta, Resource, API_VERSION};
use serde_json::{json, Value};
use store::{Key, LogLine, Options, Store};

const ORG: &str = "acme";

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"), Options::default())
        .await
        .unwrap();
    (store, dir)
}

fn spec(provisioner: &str, tags: Value) -> Value {
    json!({
        "workspace": "dev",
        "build": 1,
        "transition": "start",
        "templateVersion": "local-1",
        "provisioner": provisioner,
        "tags": tags,
        "owner": "ann",
    })
}

async fn job(store: &Store, name: &str, spec: Value) -> Key {
    let r = Resource {
        api_version: API_VERSION.into(),
        kind: Kind::ProvisionerJob.as_str().into(),
        metadata: ObjectMeta {
            name: name.into(),
            organization: Some(ORG.into()),
            ..ObjectMeta::default()
        },
        spec,
        status: Value::Null,
    };
    let created = store.create(r).await.unwrap();
    Key::of(&created).unwrap()
}

fn provisioner(name: &str, types: &[ProvisionerType], tags: &[(&str, &str)]) -> ProvisionerInfo {
    ProvisionerInfo {
        name: name.into(),
        types: types.to_vec(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        organization: None,
    }
}

async fn log_text(store: &Store, key: &Key) -> String {
    let lines = store
        .read_logs(&jobs::log_stream(ORG, &key.name), 0, 1000)
        .await
        .unwrap();
    lines
        .iter()
        .map(|l| format!("[{}] {}", l.source, l.text))
        .collect::<Vec<_>>()
        .join("\n")
}

fn succeeded() -> Outcome {
    Outcome {
        phase: Phase::Succeeded,
        error: None,
        outputs: Value::Null,
    }
}

#[tokio::test]
async fn a_claim_takes_the_oldest_job_it_can_run_once_and_bumps_the_epoch() {
    let (store, _dir) = store().await;
    let plain = job(&store, "a", spec("process", json!({}))).await;
    let gpu = job(&store, "b", spec("process", json!({"gpu": "yes"}))).await;
    let docker = job(&store, "c", spec("docker", json!({}))).await;

    let p1 = provisioner("p1", &[ProvisionerType::Process], &[]);
    let first = jobs::claim(&store, &p1, "hash-1").await.unwrap().unwrap();
    assert_eq!(first.key, plain);
    assert_eq!(first.epoch, 1);
    assert_eq!(jobs::phase(&first.job), Phase::Running);
    assert_eq!(first.job.status["holder"], "p1");
    assert_eq!(first.job.status["agentTokenHash"], "hash-1");
    // Nothing else fits p1: b needs a tag it lacks, c another provider.
    assert!(jobs::claim(&store, &p1, "hash-2").await.unwrap().is_none());

    let p2 = provisioner(
        "p2",
        &[ProvisionerType::Process, ProvisionerType::Docker],
        &[("gpu", "yes"), ("zone", "x")],
    );
    let second = jobs::claim(&store, &p2, "h").await.unwrap().unwrap();
    assert_eq!(second.key, gpu, "the oldest job p2 can run");
    let third = jobs::claim(&store, &p2, "h").await.unwrap().unwrap();
    assert_eq!(third.key, docker);
    assert!(jobs::claim(&store, &p2, "h").await.unwrap().is_none());
    assert_eq!(
        log_text(&store, &plain).await,
        "[queue] taken by provisioner p1"
    );
}

#[tokio::test]
async fn renewal_and_completion_need_the_current_epoch_and_completion_is_idempotent() {
    let (store, _dir) = store().await;
    let key = job(&store, "a", spec("process", json!({}))).await;
    let p1 = provisioner("p1", &[ProvisionerType::Process], &[]);
    let claimed = jobs::claim(&store, &p1, "h").await.unwrap().unwrap();
    assert_eq!(claimed.epoch, 1);

    let stale = jobs::renew(&store, &key, 2, vec![]).await.unwrap_err();
    assert!(
        matches!(
            stale,
            JobError::Stale {
                given: 2,
                current: 1,
                ..
            }
        ),
        "{stale}"
    );
    assert!(stale.to_string().contains("epoch 2 is stale"), "{stale}");

    let renewed = jobs::renew(&store, &key, 1, vec![LogLine::now("provision", "step one")])
        .await
        .unwrap();
    assert!(!renewed.cancel);

    let done = jobs::complete(
        &store,
        &key,
        1,
        succeeded(),
        vec![LogLine::now("provision", "done")],
    )
    .await
    .unwrap();
    assert_eq!(jobs::phase(&done), Phase::Succeeded);
    // The same outcome again (an answer lost on the way back) succeeds without a write.
    let again = jobs::complete(&store, &key, 1, succeeded(), vec![])
        .await
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        done.metadata.resource_version
    );
    let other = jobs::complete(
        &store,
        &key,
        1,
        Outcome {
            phase: Phase::Failed,
            error: Some("boom".into()),
            outputs: Value::Null,
        },
        vec![],
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            other,
            JobError::AlreadyEnded {
                phase: Phase::Succeeded,
                ..
            }
        ),
        "{other}"
    );
    let late = jobs::renew(&store, &key, 1, vec![]).await.unwrap_err();
    assert!(matches!(late, JobError::AlreadyEnded { .. }), "{late}");
    let not_an_end = jobs::complete(
        &store,
        &key,
        1,
        Outcome {
            phase: Phase::Running,
            error: None,
            outputs: Value::Null,
        },
        vec![],
    )
    .await
    .unwrap_err();
    assert!(matches!(not_an_end, JobError::NotAnEnd(Phase::Running)));
    let missing = jobs::renew(
        &store,
        &Key {
            name: "nope".into(),
            ..key.clone()
        },
        1,
        vec![],
    )
    .await
    .unwrap_err();
    assert!(matches!(missing, JobError::NotFound(_)));

    let logs = log_text(&store, &key).await;
    assert_eq!(
        logs,
        "[queue] taken by provisioner p1\n[provision] step one\n[provision] done"
    );
}

#[tokio::test]
async fn an_expired_lease_requeues_the_job_and_fences_the_old_holder() {
    let (store, _dir) = store().await;
    let key = job(&store, "a", spec("process", json!({}))).await;
    let p1 = provisioner("p1", &[ProvisionerType::Process], &[]);
    let p2 = provisioner("p2", &[ProvisionerType::Process], &[]);
    jobs::claim(&store, &p1, "h1").await.unwrap().unwrap();
    // A live lease keeps the job from p2.
    assert!(jobs::claim(&store, &p2, "h2").await.unwrap().is_none());

    // p1 stops renewing: its lease runs out.
    let held = store.get(&key).await.unwrap();
    let mut status = held.status.clone();
    status["leaseExpires"] = json!("2000-01-01T00:00:00Z");
    store
        .update_status(&key, status, held.metadata.resource_version.as_deref())
        .await
        .unwrap();

    let taken = jobs::claim(&store, &p2, "h2").await.unwrap().unwrap();
    assert_eq!(taken.epoch, 2);
    assert_eq!(taken.job.status["holder"], "p2");
    assert_eq!(taken.job.status["agentTokenHash"], "h2");
    assert!(
        log_text(&store, &key)
            .await
            .ends_with("the lease of provisioner p1 expired; re-queued and taken by p2"),
        "{}",
        log_text(&store, &key).await
    );
    // p1 comes back: whatever it reports is refused.
    assert!(matches!(
        jobs::renew(&store, &key, 1, vec![]).await,
        Err(JobError::Stale { .. })
    ));
    assert!(matches!(
        jobs::complete(&store, &key, 1, succeeded(), vec![]).await,
        Err(JobError::Stale { .. })
    ));
    jobs::complete(&store, &key, 2, succeeded(), vec![])
        .await
        .unwrap();
}

#[tokio::test]
async fn cancellation_reaches_the_holder_and_a_canceled_job_is_not_claimed() {
    let (store, _dir) = store().await;
    let key = job(&store, "a", spec("process", json!({}))).await;
    let p1 = provisioner("p1", &[ProvisionerType::Process], &[]);
    jobs::claim(&store, &p1, "h").await.unwrap().unwrap();
    let mut j = store.get(&key).await.unwrap();
    j.spec["cancel"] = json!(true);
    store.update(j).await.unwrap();
    assert!(jobs::renew(&store, &key, 1, vec![]).await.unwrap().cancel);

    let mut canceled = spec("process", json!({}));
    canceled["cancel"] = json!(true);
    job(&store, "b", canceled).await;
    assert!(jobs::claim(&store, &p1, "h").await.unwrap().is_none());
}

#[test]
fn a_job_no_live_provisioner_can_take_says_why() {
    let provisioners = Provisioners::default();
    let spec_of = |provisioner: ProvisionerType, tags: &[(&str, &str)]| ProvisionerJobSpec {
        workspace: "dev".into(),
        build: 1,
        transition: model::kinds::Transition::Start,
        template_version: "v".into(),
        provisioner,
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        owner: "ann".into(),
        parameters: BTreeMap::new(),
        cancel: false,
    };
    let plain = spec_of(ProvisionerType::Process, &[]);
    let why = provisioners.why_waiting(ORG, &plain).unwrap();
    assert!(
        why.contains("no connected provisioner runs process jobs"),
        "{why}"
    );

    provisioners.seen(&provisioner("p1", &[ProvisionerType::Process], &[]));
    assert_eq!(provisioners.why_waiting(ORG, &plain), None);
    let tagged = spec_of(ProvisionerType::Process, &[("gpu", "yes")]);
    let why = provisioners.why_waiting(ORG, &tagged).unwrap();
    assert!(why.contains("with tags gpu=yes"), "{why}");
    let docker = spec_of(ProvisionerType::Docker, &[]);
    let why = provisioners.why_waiting(ORG, &docker).unwrap();
    assert!(
        why.contains("runs docker jobs") && why.contains(ORG),
        "{why}"
    );
    provisioners.gone("p1");
    assert!(provisioners.why_waiting(ORG, &plain).is_some());
}
