//! Compile tests: `ui/pass` must compile and run, `ui/fail` must fail with the messages
//! in the `.stderr` snapshots (regenerate with `TRYBUILD=overwrite`, then read them).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
