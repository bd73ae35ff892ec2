//! Placeholder while building.
#[test]
fn builds() {
    let _: Result<vim_rs::types::structs::UserSession, _> = miniserde::json::from_str("{}");
}
