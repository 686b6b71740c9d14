//! Configuration values (`config::value`) and settings files
//! (`config::Layered::apply_toml`, then `Config::from_layered`).
//!
//! Any TOML text, and any text given to any setting as a flag or variable
//! would give it, is checked without a panic: an error names what is
//! wrong, an accepted configuration is built. The shared value parsers
//! take any text; an accepted duration stays within the documented bound.
//! (`Config::from_layered` reads no file: file settings are only paths.)
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pulso::config::value::{
    Raw, parse_bool, parse_duration, parse_list, parse_size, parse_string, parse_table, parse_u64,
};
use pulso::config::{Config, Layered, SETTINGS, Source};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    toml: &'a str,
    /// A setting (index into `SETTINGS`) and the text it is given.
    texts: Vec<(u8, &'a str)>,
}

fn values(raw: &Raw) {
    if let Ok(d) = parse_duration(raw) {
        assert!(d.as_secs_f64() <= 1e10, "duration {d:?} over the bound");
    }
    let _ = parse_size(raw);
    let _ = parse_bool(raw);
    let _ = parse_u64(raw);
    let _ = parse_string(raw);
    let _ = parse_list(raw);
    let _ = parse_table(raw);
}

fuzz_target!(|input: Input<'_>| {
    let mut layered = Layered::defaults();
    if layered.apply_toml(input.toml).is_err() {
        // The whole text as one value, and as a TOML value of a setting.
        values(&Raw::Text(input.toml.to_string()));
        if let Ok(toml::Value::Table(t)) = format!("v = {}", input.toml).parse::<toml::Value>() {
            if let Some(v) = t.get("v") {
                values(&Raw::Toml(v.clone()));
            }
        }
    }
    for (pick, text) in input.texts.iter().take(8) {
        let setting = &SETTINGS[usize::from(*pick) % SETTINGS.len()];
        values(&Raw::Text(text.to_string()));
        layered
            .set_text(setting.name, text.to_string(), Source::Flag)
            .expect("a known setting");
    }
    let _ = Config::from_layered(&layered);
});
