//! The manifests parser on any text: it returns objects and problems, never panics, and
//! every problem names the file.
#![no_main]

use lb_agent::source::manifests::parse_manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_manifest("fuzz.yaml", text);
    for problem in &parsed.problems {
        assert_eq!(problem.origin, "fuzz.yaml", "{problem}");
    }
});
