//! Secrets in the config never reach a message.

use super::*;

#[test]
fn passwords_never_reach_a_message() {
    for url in [
        "redis://corral:s3cret@10.0.0.1:6379/2",
        "rediss://:s3cret@h:1",
    ] {
        let shown = crate::redact::redact(url);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("@"), "{shown}");
    }
    assert_eq!(
        crate::redact::redact("redis://h:1/0").as_ref(),
        "redis://h:1/0"
    );
    assert_eq!(
        crate::redact::redact("redis://user@h:1").as_ref(),
        "redis://user@h:1"
    );
    let auth = MasterAuth {
        username: Some("corral".into()),
        password: Some(Secret::new("s3cret".into())),
        db: 3,
    };
    assert!(!format!("{auth:?}").contains("s3cret"));
}
