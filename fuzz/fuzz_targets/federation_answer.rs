#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| synapse_keys_worker::fuzzing::federation_answer(data));
