//! Unit tests of [`crate::l2`]: the Redis names of a key, and their Cluster slots.

use redis::cluster_routing::Slot;

use super::KeyNames;
use crate::key::KeyHasher;
use crate::target::ClientScheme;

/// A Redis Cluster hash tag: the text between a name's first `{` and the next `}`.
fn hash_tag(name: &str) -> Option<&str> {
    let (_, after) = name.split_once('{')?;
    after.split_once('}').map(|(tag, _)| tag)
}

#[test]
fn an_https_key_has_names_of_its_own_in_the_slot_of_its_plain_key() {
    let mut h = KeyHasher::new();
    h.field(b"/recommend?segment=a");
    let plain = h.finish();
    let https = plain.for_scheme(ClientScheme::Https);
    let (p, s) = (
        KeyNames::new("prod", "recommend", &plain),
        KeyNames::new("prod", "recommend", &https),
    );
    let pairs = [
        (p.entry.clone(), s.entry.clone()),
        (p.lock.clone(), s.lock.clone()),
        (p.channel.clone(), s.channel.clone()),
        (p.pass.clone(), s.pass.clone()),
        (p.relay.clone(), s.relay.clone()),
        (p.relay_log("00c0ffee"), s.relay_log("00c0ffee")),
    ];
    for (plain_name, https_name) in &pairs {
        assert_ne!(plain_name, https_name);
        let tag = hash_tag(https_name);
        assert_eq!(tag, hash_tag(plain_name), "{https_name}");
        assert_eq!(tag, Some(plain.digest_hex().as_str()), "{https_name}");
        assert_eq!(Slot::for_key(plain_name), Slot::for_key(https_name));
    }
    // No two names of the two keys are equal, across kinds too.
    let mut all: Vec<&String> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 2 * pairs.len());

    // A plain key's names are what they were before the scheme counted, byte for byte, so a
    // plain fleet keeps its cache across the upgrade.
    let hex = "89be96073b3384fa6fe32b93c5781aacca94d297ea23cec952b52203f9cb0f2b";
    assert_eq!(
        p.entry,
        "corral:prod:recommend:{89be96073b3384fa6fe32b93c5781aacca94d297ea23cec952b52203f9cb0f2b}"
    );
    assert_eq!(p.lock, format!("corral:prod:recommend:lock:{{{hex}}}"));
    assert_eq!(p.channel, format!("corral:prod:recommend:fill:{{{hex}}}"));
    assert_eq!(p.pass, format!("corral:prod:recommend:pass:{{{hex}}}"));
    assert_eq!(p.relay, format!("corral:prod:recommend:relay:{{{hex}}}"));
    assert_eq!(s.entry, format!("corral:prod:recommend:{{{hex}}}:https"));
    assert_eq!(
        s.relay_log("00c0ffee"),
        format!("corral:prod:recommend:relay:{{{hex}}}:https:00c0ffee")
    );
}
