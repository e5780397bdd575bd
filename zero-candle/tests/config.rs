//! The config: documented defaults, unknown keys rejected by name, `--set` overrides validated the
//! same way as the file.

use zero_candle::Config;

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("zc-config-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn defaults_are_the_bundled_shakespeare_run() {
    let c = Config::load(None, &[]).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.data.sources, vec![std::path::PathBuf::from("data/shakespeare")]);
    assert_eq!(c.data.tokenizer, "char");
    assert!(c.train.max_steps > 0);
    assert_eq!(c.train.out_dir, std::path::PathBuf::from("runs/default"));
}

#[test]
fn file_values_and_set_overrides_apply_in_order() {
    let path = write("apply", "[train]\nmax_steps = 7\nlr = 1e-3\n[model]\npreset = \"char-small\"\n");
    let c = Config::load(Some(&path), &["train.max_steps=9".into(), "train.out_dir=/tmp/x".into()]).unwrap();
    assert_eq!(c.train.max_steps, 9);
    assert_eq!(c.train.lr, 1e-3);
    assert_eq!(c.model.preset, "char-small");
    assert_eq!(c.train.out_dir, std::path::PathBuf::from("/tmp/x"));
}

#[test]
fn unknown_key_in_file_is_rejected_naming_the_key() {
    let path = write("unknown", "[train]\nmax_stepz = 7\n");
    let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(err.contains("max_stepz"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn unknown_key_or_section_in_set_is_rejected_naming_it() {
    let err = Config::load(None, &["train.bogus=1".into()]).unwrap_err().to_string();
    assert!(err.contains("bogus"), "{err}");
    let err = Config::load(None, &["trian.max_steps=1".into()]).unwrap_err().to_string();
    assert!(err.contains("trian"), "{err}");
    let err = Config::load(None, &["max_steps=1".into()]).unwrap_err().to_string();
    assert!(err.contains("section.key"), "{err}");
}

#[test]
fn wrong_types_and_bad_values_are_rejected() {
    let err = Config::load(None, &["train.max_steps=\"many\"".into()]).unwrap_err().to_string();
    assert!(err.contains("max_steps"), "{err}");
    let err = Config::load(None, &["train.lr=-1".into()]).unwrap_err().to_string();
    assert!(err.contains("train.lr"), "{err}");
    let err = Config::load(None, &["train.batch_size=0".into()]).unwrap_err().to_string();
    assert!(err.contains("train.batch_size"), "{err}");
}

#[test]
fn missing_or_invalid_config_file_names_the_file() {
    let missing = std::path::Path::new("/nonexistent/zc.toml");
    let err = Config::load(Some(missing), &[]).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/zc.toml"), "{err}");
    let path = write("invalid", "[train\nmax_steps = 1\n");
    let err = Config::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(err.contains("not valid TOML"), "{err}");
}

#[test]
fn resolved_config_round_trips_through_toml() {
    let c = Config::load(None, &["train.max_steps=3".into(), "sample.top_k=5".into()]).unwrap();
    let path = write("roundtrip", &c.to_toml());
    assert_eq!(Config::load(Some(&path), &[]).unwrap(), c);
}
