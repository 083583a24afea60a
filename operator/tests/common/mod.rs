//! Helpers shared by the operator's integration tests: snapshot files that
//! fail on drift and are rewritten with `POSTERN_UPDATE_SNAPSHOTS=1`, and
//! MailQueue fixtures.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use postern_operator::crd::MailQueue;

/// Environment variable that rewrites snapshots and generated files instead of comparing.
pub const UPDATE: &str = "POSTERN_UPDATE_SNAPSHOTS";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_owned()
}

/// Compares `actual` with the committed file at `path` (relative to the
/// repository root), or rewrites the file when [`UPDATE`] is set.
pub fn assert_file(path: &str, actual: &str) {
    let file = repo_root().join(path);
    if std::env::var_os(UPDATE).is_some() {
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&file)
        .unwrap_or_else(|err| panic!("{path}: {err}; run with {UPDATE}=1 to create it"));
    if expected != actual {
        let diff = first_difference(&expected, actual);
        panic!("{path} differs from what the code generates ({diff}); review, then run with {UPDATE}=1 to rewrite it");
    }
}

fn first_difference(expected: &str, actual: &str) -> String {
    for (number, (want, got)) in expected.lines().zip(actual.lines()).enumerate() {
        if want != got {
            return format!("line {}: committed {want:?}, generated {got:?}", number + 1);
        }
    }
    format!(
        "committed has {} lines, generated {}",
        expected.lines().count(),
        actual.lines().count()
    )
}

/// A MailQueue read from a YAML file under the repository root, with the
/// namespace and uid the API server would have given it.
pub fn mail_queue_from(path: &str) -> MailQueue {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap();
    let mut mq: MailQueue = serde_yaml::from_str(&text).unwrap();
    stamp(&mut mq);
    mq
}

/// A MailQueue from its spec as JSON.
pub fn mail_queue(name: &str, spec: serde_json::Value) -> MailQueue {
    let mut mq = MailQueue::new(name, serde_json::from_value(spec).unwrap());
    stamp(&mut mq);
    mq
}

fn stamp(mq: &mut MailQueue) {
    mq.metadata.namespace.get_or_insert_with(|| "mail".into());
    mq.metadata.uid = Some("8d2f7a4e-0000-4000-8000-000000000001".into());
    mq.metadata.generation = Some(1);
}
