//! Hook positions: negative ones count from the row's end; out of range is an error.

use lqa::hooks::Positions;

#[test]
fn negative_positions_count_from_the_end() {
    assert_eq!(Positions::resolve(None, 5).unwrap(), Positions::All);
    assert_eq!(
        Positions::resolve(Some(&[0, -1, 2, -5]), 5).unwrap(),
        Positions::List(vec![0, 4, 2, 0])
    );
    for bad in [5, -6] {
        let e = Positions::resolve(Some(&[bad]), 5).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("position {bad} is outside the prompt of 5 tokens")
        );
    }
}
