//! Checked conversions where a client's number meets time: a TTL or an age in seconds
//! becomes milliseconds and is added to timestamps, so an unchecked product wraps (a TTL of
//! 18446744073709552 s once became 384 ms) and an unchecked sum makes every document look
//! old. Out-of-range values are [`ServiceError::Invalid`] (HTTP 400), never wrapped or
//! saturated into a different meaning.

use crate::{ServiceError, ServiceResult};

/// The longest duration a client may give in seconds: 100 years. Far beyond any useful
/// TTL or age, and small enough that milliseconds since 1970 plus it never overflow u64.
pub const MAX_SECONDS: u64 = 100 * 365 * 24 * 3600;

// Milliseconds since 1970 (until the year 2100, times 1000 for margin) plus the largest
// accepted duration stay below u64::MAX.
const _: () = assert!(u64::MAX - MAX_SECONDS * 1000 > 4_102_444_800_000 * 1000);

/// `seconds` (the client's field `field`) in milliseconds, or a 400 naming the field.
pub fn seconds_to_ms(field: &str, seconds: u64) -> ServiceResult<u64> {
    if seconds > MAX_SECONDS {
        return Err(ServiceError::Invalid(format!(
            "`{field}` must be at most {MAX_SECONDS} (100 years); got {seconds}"
        )));
    }
    // Cannot overflow: MAX_SECONDS * 1000 < 2^42.
    Ok(seconds * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_in_range_convert_and_larger_ones_are_refused() {
        assert_eq!(seconds_to_ms("ttl_seconds", 0).unwrap(), 0);
        assert_eq!(seconds_to_ms("ttl_seconds", 90).unwrap(), 90_000);
        assert_eq!(
            seconds_to_ms("ttl_seconds", MAX_SECONDS).unwrap(),
            MAX_SECONDS * 1000
        );
        for bad in [MAX_SECONDS + 1, 18_446_744_073_709_552, u64::MAX] {
            let err = seconds_to_ms("ttl_seconds", bad).unwrap_err();
            assert!(
                matches!(&err, ServiceError::Invalid(m) if m.contains("ttl_seconds")),
                "{err:?}"
            );
        }
    }
}
