//! Webhook verification and parsing against payloads in the Git hosts' and the registry's documented formats
//! (`tests/payloads/`).

use ci::hooks::{self, hex, GitPush, HookError, Parsed};
use model::kinds::{Event, GitProvider};

fn payload(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/payloads/{name}.json", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn header<'a>(name: &'static str, value: &'a str) -> impl Fn(&str) -> Option<&'a str> {
    move |n| (n == name).then_some(value)
}

fn run(p: Result<Parsed, HookError>) -> GitPush {
    match p {
        Ok(Parsed::Run(push)) => push,
        other => panic!("expected a run, got {other:?}"),
    }
}

#[test]
fn hmac_matches_the_published_vectors() {
    // RFC 4231, test case 2.
    assert_eq!(
        hex(&hooks::hmac_sha256(
            b"Jefe",
            b"what do ya want for nothing?"
        )),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // RFC 4231, test case 6: a key longer than the block is hashed first.
    assert_eq!(
        hex(&hooks::hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First"
        )),
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
    );
    // GitHub's documentation of X-Hub-Signature-256.
    assert_eq!(
        hex(&hooks::hmac_sha256(
            b"It's a Secret to Everybody",
            b"Hello, World!"
        )),
        "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[test]
fn signatures_and_tokens_are_checked() {
    let body = payload("github-push");
    let sig = format!("sha256={}", hex(&hooks::hmac_sha256(b"s3cret", &body)));
    assert_eq!(
        hooks::verify(
            GitProvider::Github,
            b"s3cret",
            header("x-hub-signature-256", &sig),
            &body
        ),
        Ok(())
    );
    // The wrong secret, a changed body, a missing or malformed header: each refused with what was wrong.
    let err = |r: Result<(), HookError>| match r {
        Err(HookError::Unauthorized(m)) => m,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(err(hooks::verify(
        GitProvider::Github,
        b"other",
        header("x-hub-signature-256", &sig),
        &body
    ))
    .contains("does not match"));
    let mut changed = body.clone();
    changed.push(b' ');
    assert!(err(hooks::verify(
        GitProvider::Github,
        b"s3cret",
        header("x-hub-signature-256", &sig),
        &changed
    ))
    .contains("does not match"));
    assert_eq!(
        err(hooks::verify(
            GitProvider::Github,
            b"s3cret",
            |_| None,
            &body
        )),
        "X-Hub-Signature-256 is missing"
    );
    assert!(err(hooks::verify(
        GitProvider::Github,
        b"s3cret",
        header("x-hub-signature-256", "sha256=zz"),
        &body
    ))
    .contains("64 hexadecimal digits"));
    // Gitea signs the same way, without the prefix.
    let plain = hex(&hooks::hmac_sha256(b"s3cret", &body));
    assert_eq!(
        hooks::verify(
            GitProvider::Gitea,
            b"s3cret",
            header("x-gitea-signature", &plain),
            &body
        ),
        Ok(())
    );
    let prefixed = format!("sha256={plain}");
    assert!(hooks::verify(
        GitProvider::Gitea,
        b"s3cret",
        header("x-gitea-signature", &prefixed),
        &body
    )
    .is_err());
    // GitLab sends the token itself.
    assert_eq!(
        hooks::verify(
            GitProvider::Gitlab,
            b"s3cret",
            header("x-gitlab-token", "s3cret"),
            &body
        ),
        Ok(())
    );
    assert!(err(hooks::verify(
        GitProvider::Gitlab,
        b"s3cret",
        header("x-gitlab-token", "s3cret "),
        &body
    ))
    .contains("does not match"));
}

#[test]
fn github_payloads() {
    let push = run(hooks::parse(
        GitProvider::Github,
        "push",
        &payload("github-push"),
    ));
    assert_eq!(push.event, Event::Push);
    assert_eq!(push.branch.as_deref(), Some("main"));
    assert_eq!(push.commit, "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c");
    assert_eq!(
        push.before.as_deref(),
        Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
    );
    let tag = run(hooks::parse(
        GitProvider::Github,
        "push",
        &payload("github-tag"),
    ));
    assert_eq!(
        (tag.event, tag.branch, tag.tag.as_deref()),
        (Event::Tag, None, Some("v1.2.0"))
    );
    let pr = run(hooks::parse(
        GitProvider::Github,
        "pull_request",
        &payload("github-pull_request"),
    ));
    assert_eq!(pr.event, Event::PullRequest);
    assert_eq!(pr.branch.as_deref(), Some("changes"));
    assert_eq!(pr.target_branch.as_deref(), Some("main"));
    assert_eq!(pr.pull_request, Some(7));
    assert_eq!(pr.git_ref, "refs/pull/7/head");
    assert_eq!(pr.commit, "ec26c3e57ca3a959ca5aad62de7213c562f8c821");

    // A closed pull request, a deleted branch and a ping start nothing; an unknown event is refused.
    let mut closed: serde_json::Value =
        serde_json::from_slice(&payload("github-pull_request")).unwrap();
    closed["action"] = "closed".into();
    assert!(matches!(
        hooks::parse(GitProvider::Github, "pull_request", closed.to_string().as_bytes()),
        Ok(Parsed::Ignore(m)) if m.contains("#7 was closed")
    ));
    let mut deleted: serde_json::Value = serde_json::from_slice(&payload("github-push")).unwrap();
    deleted["after"] = "0000000000000000000000000000000000000000".into();
    assert!(matches!(
        hooks::parse(GitProvider::Github, "push", deleted.to_string().as_bytes()),
        Ok(Parsed::Ignore(m)) if m == "refs/heads/main was deleted"
    ));
    assert_eq!(
        hooks::parse(GitProvider::Github, "ping", b"{\"zen\": \"x\"}"),
        Ok(Parsed::Ignore("ping".into()))
    );
    assert!(matches!(
        hooks::parse(GitProvider::Github, "issues", b"{}"),
        Err(HookError::BadRequest(m)) if m.contains("\"issues\" does not start runs")
    ));
}

#[test]
fn gitlab_payloads() {
    let push = run(hooks::parse(
        GitProvider::Gitlab,
        "Push Hook",
        &payload("gitlab-push"),
    ));
    assert_eq!(
        (push.event, push.branch.as_deref(), push.commit.as_str()),
        (
            Event::Push,
            Some("main"),
            "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
        )
    );
    let tag = run(hooks::parse(
        GitProvider::Gitlab,
        "Tag Push Hook",
        &payload("gitlab-tag_push"),
    ));
    assert_eq!(
        (tag.event, tag.tag.as_deref()),
        (Event::Tag, Some("v1.0.0"))
    );
    let mr = run(hooks::parse(
        GitProvider::Gitlab,
        "Merge Request Hook",
        &payload("gitlab-merge_request"),
    ));
    assert_eq!(mr.event, Event::PullRequest);
    assert_eq!(mr.branch.as_deref(), Some("ms-viewport"));
    assert_eq!(mr.target_branch.as_deref(), Some("main"));
    assert_eq!(mr.git_ref, "refs/merge-requests/1/head");
    // A tag push announced as a branch push is malformed.
    assert!(matches!(
        hooks::parse(
            GitProvider::Gitlab,
            "Push Hook",
            &payload("gitlab-tag_push")
        ),
        Err(HookError::BadRequest(_))
    ));
}

#[test]
fn gitea_payloads() {
    let push = run(hooks::parse(
        GitProvider::Gitea,
        "push",
        &payload("gitea-push"),
    ));
    assert_eq!(push.branch.as_deref(), Some("develop"));
    let pr = run(hooks::parse(
        GitProvider::Gitea,
        "pull_request",
        &payload("gitea-pull_request"),
    ));
    assert_eq!(
        (pr.pull_request, pr.target_branch.as_deref()),
        (Some(3), Some("master"))
    );
    // GitHub's action name is not Gitea's.
    let mut gh_named: serde_json::Value =
        serde_json::from_slice(&payload("gitea-pull_request")).unwrap();
    gh_named["action"] = "synchronize".into();
    assert!(matches!(
        hooks::parse(
            GitProvider::Gitea,
            "pull_request",
            gh_named.to_string().as_bytes()
        ),
        Ok(Parsed::Ignore(_))
    ));
}

#[test]
fn malformed_payloads_say_what_is_wrong() {
    for (provider, event) in [
        (GitProvider::Github, "push"),
        (GitProvider::Github, "pull_request"),
        (GitProvider::Gitlab, "Push Hook"),
        (GitProvider::Gitlab, "Merge Request Hook"),
        (GitProvider::Gitea, "push"),
    ] {
        for body in [&b""[..], b"{", b"[]", b"{\"ref\": 5}", b"\xff\xfe"] {
            match hooks::parse(provider, event, body) {
                Err(HookError::BadRequest(m)) => assert!(m.contains("malformed"), "{m}"),
                other => panic!("{provider:?} {event} {body:?}: {other:?}"),
            }
        }
    }
    let odd_ref = br#"{"ref": "refs/notes/x", "before": "a", "after": "bffeb74224043ba2feb48d137756c8a9331c449a"}"#;
    assert!(matches!(
        hooks::parse(GitProvider::Github, "push", odd_ref),
        Err(HookError::BadRequest(m)) if m.contains("neither a branch")
    ));
}

#[test]
fn registry_notifications_yield_tagged_manifest_pushes() {
    let pushes = hooks::registry_pushes(&payload("registry-push")).expect("parses");
    assert_eq!(pushes.len(), 1, "{pushes:?}");
    let p = &pushes[0];
    assert_eq!(
        (p.repository.as_str(), p.tag.as_str()),
        ("shop/api", "1.4.0")
    );
    assert_eq!(
        p.image,
        "registry.example.com:5000/shop/api:1.4.0@sha256:fea8895f450959fa676bcc1df0611ea93823a735a01205fd8622846041d0c7cf"
    );
    assert!(matches!(
        hooks::registry_pushes(b"{\"events\": 3}"),
        Err(HookError::BadRequest(_))
    ));
}

#[test]
fn the_fuzz_property_holds_on_the_payloads_and_their_mutilations() {
    for name in [
        "github-push",
        "github-tag",
        "github-pull_request",
        "gitlab-push",
        "gitlab-tag_push",
        "gitlab-merge_request",
        "gitea-push",
        "gitea-pull_request",
        "registry-push",
    ] {
        let body = payload(name);
        for selector in 0..8u8 {
            let mut input = vec![selector];
            input.extend_from_slice(&body);
            hooks::fuzzing::check(&input);
            // Every prefix, and the body with one byte changed at a time (sampled).
            for cut in (0..input.len()).step_by(97) {
                hooks::fuzzing::check(&input[..cut]);
                let mut changed = input.clone();
                changed[cut] ^= 0x5a;
                hooks::fuzzing::check(&changed);
            }
        }
    }
}
