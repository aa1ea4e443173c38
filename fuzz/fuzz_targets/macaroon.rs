#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synapse_keys_worker::fuzzing::macaroon(data));
