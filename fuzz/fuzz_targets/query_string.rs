#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synapse_keys_worker::fuzzing::query_string(data));
