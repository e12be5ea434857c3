//! The tariff arithmetic: what a quantity of traffic costs (docs/billing.md, "Charges").
//!
//! ```text
//! charge(bytes) = 0                                  when bytes = 0 or the price is 0
//!               = max(min_charge, round(bytes × price_per_mb / 1,048,576))   otherwise
//! round         = to the nearest minor unit, halves up (exact: integer arithmetic in u128)
//! ```
//!
//! A charge is computed once per *charged quantity* (one zone's traffic of one user between
//! two retrievals, see `billing::run`), never per message: splitting the same traffic into
//! more delivery records changes nothing, and a quantity split over `n` charges differs from
//! one charge by at most `n − 1` halves of a minor unit (each rounding is off by at most ½).

use std::collections::HashMap;

use crate::billing::ledger::Tariff;
use crate::billing::money::{Money, MoneyError};

/// Bytes in the MB that prices are quoted per (the seed's MB: 2²⁰).
pub const BYTES_PER_MB: u64 = 1 << 20;

/// What `bytes` of traffic cost at `tariff`.
pub fn charge(bytes: u64, price_per_mb: Money, min_charge: Money) -> Result<Money, MoneyError> {
    let price = u128::try_from(price_per_mb.minor()).map_err(|_| MoneyError::Arithmetic)?;
    if bytes == 0 || price == 0 {
        return Ok(Money::from_minor(0));
    }
    let mb = u128::from(BYTES_PER_MB);
    let rounded = (u128::from(bytes) * price + mb / 2) / mb;
    let minor = i64::try_from(rounded).map_err(|_| MoneyError::Arithmetic)?;
    Ok(Money::from_minor(minor.max(min_charge.minor())))
}

/// The tariffs in force, looked up by (class, zone). A class without a tariff for a zone is
/// charged nothing there and reported ([`Tariffs::price`] returns `None`).
#[derive(Clone, Debug, Default)]
pub struct Tariffs(HashMap<(String, String), Tariff>);

impl Tariffs {
    pub fn new(list: &[Tariff]) -> Self {
        Self(
            list.iter()
                .map(|t| ((t.class.clone(), t.zone.clone()), t.clone()))
                .collect(),
        )
    }

    pub fn list(&self) -> Vec<Tariff> {
        let mut v: Vec<Tariff> = self.0.values().cloned().collect();
        v.sort_by(|a, b| (&a.class, &a.zone).cmp(&(&b.class, &b.zone)));
        v
    }

    pub fn price(&self, class: &str, zone: &str) -> Option<&Tariff> {
        self.0.get(&(class.to_owned(), zone.to_owned()))
    }

    /// What `bytes` in `zone` cost a user of `class`; `None` when no tariff applies.
    pub fn charge(&self, class: &str, zone: &str, bytes: u64) -> Option<Result<Money, MoneyError>> {
        self.price(class, zone)
            .map(|t| charge(bytes, t.price_per_mb, t.min_charge))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn m(minor: i64) -> Money {
        Money::from_minor(minor)
    }

    #[test]
    fn rounds_to_the_nearest_minor_unit_halves_up() {
        let mb = BYTES_PER_MB;
        assert_eq!(charge(mb, m(30), m(0)).unwrap(), m(30));
        assert_eq!(charge(10 * mb, m(30), m(0)).unwrap(), m(300));
        // 1 byte short of half a minor unit rounds down, exactly half rounds up.
        assert_eq!(charge(mb / 2 - 1, m(1), m(0)).unwrap(), m(0));
        assert_eq!(charge(mb / 2, m(1), m(0)).unwrap(), m(1));
        assert_eq!(charge(0, m(30), m(5)).unwrap(), m(0));
        assert_eq!(
            charge(mb, m(0), m(5)).unwrap(),
            m(0),
            "a free zone stays free"
        );
        assert_eq!(charge(1, m(30), m(5)).unwrap(), m(5), "minimum charge");
        let expected = (u128::from(u64::MAX) * 10_000 + u128::from(BYTES_PER_MB) / 2)
            / u128::from(BYTES_PER_MB);
        assert_eq!(
            u128::try_from(charge(u64::MAX, m(10_000), m(0)).unwrap().minor()).unwrap(),
            expected,
            "no overflow on the largest byte count"
        );
    }

    #[test]
    fn negative_price_is_an_error_not_a_credit() {
        assert!(charge(1, m(-1), m(0)).is_err());
    }

    /// The property docs/billing.md states: splitting a quantity into any records that are
    /// charged together changes nothing; splitting it over `n` separate charges changes the
    /// total by at most n/2 minor units (no minimum charge).
    #[test]
    fn splitting_traffic_changes_the_charge_by_at_most_the_rounding() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for _ in 0..20_000 {
            let total: u64 = rng.gen_range(0..50 * BYTES_PER_MB);
            let price = m(rng.gen_range(0..5_000));
            let whole = charge(total, price, m(0)).unwrap().minor();
            let n: u64 = rng.gen_range(1..40);
            let mut cuts: Vec<u64> = (0..n - 1).map(|_| rng.gen_range(0..=total)).collect();
            cuts.push(0);
            cuts.push(total);
            cuts.sort_unstable();
            let parts: Vec<u64> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
            // Records of one charged quantity are summed before rounding: exactly the same.
            let summed: u64 = parts.iter().sum();
            assert_eq!(charge(summed, price, m(0)).unwrap().minor(), whole);
            // Charged separately: each rounding is off by at most half a minor unit.
            let separate: i64 = parts
                .iter()
                .map(|&b| charge(b, price, m(0)).unwrap().minor())
                .sum();
            let bound = (parts.len() as i64 + 1) / 2;
            assert!(
                (separate - whole).abs() <= bound,
                "total {total} price {price} parts {parts:?}: {separate} vs {whole}"
            );
        }
    }
}
