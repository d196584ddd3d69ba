//! `lb-testkit`: the small backend server and client the end-to-end tests run inside pod namespaces.
//!
//! All logic lives in `lb_tests::testkit`; this file only hands over to it.

fn main() -> std::process::ExitCode {
    lb_tests::testkit::main()
}
