//! When a job fires: [`Schedule`] (an interval, one time, or a cron expression in a time
//! zone) and the one question the job table asks of it, "the first slot after this
//! time". Times are Unix milliseconds on the runtime's clock ([`grid_core::clock::unix_ms`]),
//! so that every replica computes the same slots and the simulator drives them.
//!
//! Cron expressions use Quartz's syntax: six fields (seconds, minutes, hours, day of month,
//! month, day of week) and an optional seventh (year, which must be `*` or empty here), with
//! `?`, `L`, `W` and `#`, and days of the week numbered 1 (Sunday) to 7 (Saturday) or named
//! (`MON`). They are evaluated by the `croner` crate on the wall clock of an IANA time zone
//! (`chrono-tz`): a time that a daylight-saving change skips fires at the first instant
//! after the gap; a time that a change repeats fires once, at its first pass.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, LocalResult, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use serde::{Deserialize, Serialize};

use super::SchedulerError;

/// When a job fires.
///
/// ```
/// use std::time::Duration;
/// use grid_exec::scheduler::Schedule;
///
/// // Every 10 s from a given instant (Unix ms).
/// let every = Schedule::interval(Duration::from_secs(10), Some(1_700_000_000_000));
/// assert_eq!(every.first_at_or_after(1_700_000_000_001).unwrap(), Some(1_700_000_010_000));
///
/// // Every day at 02:00 in Paris, daylight saving included.
/// let nightly = Schedule::cron("0 0 2 * * ?", "Europe/Paris").unwrap();
/// assert!(nightly.first_after(1_700_000_000_000).unwrap().is_some());
///
/// // A cron expression that does not parse is an error at once.
/// assert!(Schedule::cron("every night", "Europe/Paris").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Every `period_ms`, from `first_run_ms` (a Unix ms; `None`: one period after the job
    /// is scheduled).
    Interval {
        /// The period, in ms (at least 1).
        period_ms: u64,
        /// The first slot, in Unix ms.
        first_run_ms: Option<u64>,
    },
    /// Once, at `at_ms` (Unix ms; a time already past fires at once).
    Once {
        /// When.
        at_ms: u64,
    },
    /// A Quartz cron expression on the wall clock of `time_zone` (an IANA name).
    Cron {
        /// The expression, as given.
        expr: String,
        /// The IANA time zone, e.g. `Europe/Paris` or `UTC`.
        time_zone: String,
    },
}

impl Schedule {
    /// Every `period` (at least 1 ms), first at `first_run` (Unix ms), or one period after
    /// the job is scheduled when `None`.
    pub fn interval(period: Duration, first_run: Option<u64>) -> Self {
        Self::Interval {
            period_ms: (period.as_millis() as u64).max(1),
            first_run_ms: first_run,
        }
    }

    /// Once, at `at` (Unix ms).
    pub fn run_once(at: u64) -> Self {
        Self::Once { at_ms: at }
    }

    /// A Quartz cron expression on the wall clock of `time_zone` (an IANA name); an
    /// expression or a zone that does not parse is an error here.
    pub fn cron(expr: &str, time_zone: &str) -> Result<Self, SchedulerError> {
        let schedule = Self::Cron {
            expr: expr.to_string(),
            time_zone: time_zone.to_string(),
        };
        schedule.check()?;
        Ok(schedule)
    }

    /// Checks that the schedule can be evaluated (a cron expression and its zone parse).
    pub fn check(&self) -> Result<(), SchedulerError> {
        match self {
            Self::Interval { period_ms: 0, .. } => {
                Err(SchedulerError::BadSchedule("an interval of 0 ms".into()))
            }
            Self::Cron { expr, time_zone } => parse_cron(expr, time_zone).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// The first slot at or after `now` for a job scheduled at `now` (an interval without
    /// a first run starts one period later; a one-time job already past fires at once).
    pub fn first_at_or_after(&self, now: u64) -> Result<Option<u64>, SchedulerError> {
        match self {
            Self::Interval {
                period_ms,
                first_run_ms: None,
            } => Ok(Some(now.saturating_add(*period_ms))),
            Self::Once { at_ms } => Ok(Some(*at_ms)),
            _ => self.first_after(now.saturating_sub(1)),
        }
    }

    /// The first slot strictly after `after` (`None`: there is none: a one-time job, or a
    /// cron expression that never matches again).
    pub fn first_after(&self, after: u64) -> Result<Option<u64>, SchedulerError> {
        match self {
            Self::Interval {
                period_ms,
                first_run_ms,
            } => {
                let period = (*period_ms).max(1);
                let first = first_run_ms.unwrap_or(0);
                if first > after {
                    return Ok(Some(first));
                }
                let k = (after - first) / period + 1;
                Ok(k.checked_mul(period).and_then(|d| first.checked_add(d)))
            }
            Self::Once { at_ms } => Ok((*at_ms > after).then_some(*at_ms)),
            Self::Cron { expr, time_zone } => {
                let (cron, tz) = parse_cron(expr, time_zone)?;
                cron_after(&cron, tz, after)
            }
        }
    }

    /// The period of an interval, for diagnostics.
    pub fn period(&self) -> Option<Duration> {
        match self {
            Self::Interval { period_ms, .. } => Some(Duration::from_millis(*period_ms)),
            _ => None,
        }
    }
}

/// Parses a Quartz expression for croner: 6 fields, or 7 with a year of `*`.
fn parse_cron(expr: &str, time_zone: &str) -> Result<(Cron, Tz), SchedulerError> {
    let tz = Tz::from_str(time_zone)
        .map_err(|_| SchedulerError::BadSchedule(format!("unknown time zone {time_zone:?}")))?;
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let fields = match fields.len() {
        6 => fields,
        7 if fields[6] == "*" || fields[6] == "?" => fields[..6].to_vec(),
        7 => {
            return Err(SchedulerError::BadSchedule(format!(
                "cron {expr:?}: a year field other than * is not supported"
            )))
        }
        n => {
            return Err(SchedulerError::BadSchedule(format!(
                "cron {expr:?}: {n} fields; Quartz expressions have 6 (seconds first) or 7"
            )))
        }
    };
    let cron = Cron::new(&fields.join(" "))
        .with_seconds_required()
        .with_alternative_weekdays()
        .parse()
        .map_err(|e| SchedulerError::BadSchedule(format!("cron {expr:?}: {e}")))?;
    Ok((cron, tz))
}

fn to_datetime(tz: Tz, ms: u64) -> Result<DateTime<Tz>, SchedulerError> {
    let utc = Utc
        .timestamp_millis_opt(i64::try_from(ms).unwrap_or(i64::MAX))
        .single()
        .ok_or_else(|| SchedulerError::BadSchedule(format!("time {ms} out of range")))?;
    Ok(utc.with_timezone(&tz))
}

fn to_ms(t: &DateTime<Tz>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

/// The first cron slot strictly after `after`. croner searches on the wall clock and maps
/// an ambiguous local time (a repeated hour) to its first pass, which can be earlier than
/// `after` when `after` lies in the second pass: then the second pass is taken.
fn cron_after(cron: &Cron, tz: Tz, after: u64) -> Result<Option<u64>, SchedulerError> {
    // Whole seconds: croner matches seconds, and searches from the next one.
    let start = to_datetime(tz, after - after % 1000)?;
    let next = match cron.find_next_occurrence(&start, false) {
        Ok(next) => next,
        Err(croner::errors::CronError::TimeSearchLimitExceeded) => return Ok(None),
        Err(e) => return Err(SchedulerError::BadSchedule(format!("cron: {e}"))),
    };
    let ms = to_ms(&next);
    if ms > after {
        return Ok(Some(ms));
    }
    if let LocalResult::Ambiguous(_, later) = tz.from_local_datetime(&next.naive_local()) {
        let later = to_ms(&later);
        if later > after {
            return Ok(Some(later));
        }
    }
    // Still not after (cannot happen with whole seconds): search from a second later.
    let start = to_datetime(tz, after - after % 1000 + 1000)?;
    match cron.find_next_occurrence(&start, false) {
        Ok(next) if to_ms(&next) > after => Ok(Some(to_ms(&next))),
        Ok(_) | Err(croner::errors::CronError::TimeSearchLimitExceeded) => Ok(None),
        Err(e) => Err(SchedulerError::BadSchedule(format!("cron: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn utc_ms(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
        let t = NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, s)
            .unwrap()
            .and_utc();
        t.timestamp_millis() as u64
    }

    fn slots(s: &Schedule, from: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        let mut t = from;
        for _ in 0..n {
            match s.first_after(t).unwrap() {
                Some(next) => {
                    assert!(next > t, "slot {next} not after {t}");
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    #[test]
    fn intervals_count_from_their_first_run() {
        let s = Schedule::interval(Duration::from_secs(1), Some(10_000));
        assert_eq!(s.first_after(0).unwrap(), Some(10_000));
        assert_eq!(s.first_after(10_000).unwrap(), Some(11_000));
        assert_eq!(s.first_after(10_999).unwrap(), Some(11_000));
        assert_eq!(s.first_at_or_after(11_000).unwrap(), Some(11_000));
        assert_eq!(s.first_at_or_after(11_001).unwrap(), Some(12_000));
        let s = Schedule::interval(Duration::from_secs(5), None);
        assert_eq!(s.first_at_or_after(1_000).unwrap(), Some(6_000));
        assert_eq!(s.first_after(6_000).unwrap(), Some(10_000)); // aligned on 0 + k·5 s
        assert!(Schedule::interval(Duration::ZERO, None).check().is_ok()); // rounded to 1 ms
        assert!(Schedule::Interval {
            period_ms: 0,
            first_run_ms: None
        }
        .check()
        .is_err());
    }

    #[test]
    fn a_one_time_job_has_one_slot_even_when_past() {
        let s = Schedule::run_once(5_000);
        assert_eq!(s.first_at_or_after(9_000).unwrap(), Some(5_000));
        assert_eq!(s.first_after(4_999).unwrap(), Some(5_000));
        assert_eq!(s.first_after(5_000).unwrap(), None);
    }

    #[test]
    fn bad_cron_expressions_and_zones_are_refused() {
        for bad in [
            "",
            "0 0 * * *",          // no seconds field
            "0 0 0 * * ? 2030",   // a year
            "61 0 0 * * ?",       // a second out of range
            "0 0 0 32 * ?",       // a day out of range
            "0 0 0 * * MON#9",    // no ninth Monday
            "every night at two", // not cron at all
        ] {
            assert!(Schedule::cron(bad, "UTC").is_err(), "{bad:?} was accepted");
        }
        assert!(Schedule::cron("0 0 0 * * ?", "Mars/Olympus").is_err());
        assert!(Schedule::cron("0 0 0 * * ? *", "UTC").is_ok());
    }

    #[test]
    fn quartz_syntax_seconds_question_mark_l_w_and_hash() {
        let jan1 = utc_ms(2026, 1, 1, 0, 0, 0);
        // Every 15 s.
        let s = Schedule::cron("0/15 * * * * ?", "UTC").unwrap();
        assert_eq!(
            slots(&s, jan1, 3),
            vec![jan1 + 15_000, jan1 + 30_000, jan1 + 45_000]
        );
        // Every 4 hours (the issue's example).
        let s = Schedule::cron("0 0 0/4 * * ?", "UTC").unwrap();
        assert_eq!(
            slots(&s, jan1, 2),
            vec![utc_ms(2026, 1, 1, 4, 0, 0), utc_ms(2026, 1, 1, 8, 0, 0)]
        );
        // The last day of the month.
        let s = Schedule::cron("0 0 12 L * ?", "UTC").unwrap();
        assert_eq!(
            slots(&s, jan1, 2),
            vec![utc_ms(2026, 1, 31, 12, 0, 0), utc_ms(2026, 2, 28, 12, 0, 0)]
        );
        // The weekday nearest the 1st: 2026-02-01 is a Sunday, so Monday the 2nd.
        let s = Schedule::cron("0 0 9 1W * ?", "UTC").unwrap();
        assert_eq!(
            s.first_after(utc_ms(2026, 1, 15, 0, 0, 0)).unwrap(),
            Some(utc_ms(2026, 2, 2, 9, 0, 0))
        );
        // The second Monday (Quartz numbers days 1 = Sunday, so Monday is 2).
        let s = Schedule::cron("0 0 9 ? * 2#2", "UTC").unwrap();
        assert_eq!(
            s.first_after(jan1).unwrap(),
            Some(utc_ms(2026, 1, 12, 9, 0, 0))
        );
        let s = Schedule::cron("0 0 9 ? * MON#2", "UTC").unwrap();
        assert_eq!(
            s.first_after(jan1).unwrap(),
            Some(utc_ms(2026, 1, 12, 9, 0, 0))
        );
        // Quartz's 1 is Sunday: 2026-01-04.
        let s = Schedule::cron("0 0 9 ? * 1", "UTC").unwrap();
        assert_eq!(
            s.first_after(jan1).unwrap(),
            Some(utc_ms(2026, 1, 4, 9, 0, 0))
        );
    }

    #[test]
    fn a_daily_job_keeps_its_local_hour_across_both_dst_changes() {
        // New York: summer time starts 2026-03-08 (02:00 -> 03:00) and ends 2026-11-01.
        let s = Schedule::cron("0 0 9 * * ?", "America/New_York").unwrap();
        let got = slots(&s, utc_ms(2026, 3, 7, 0, 0, 0), 3);
        assert_eq!(
            got,
            vec![
                utc_ms(2026, 3, 7, 14, 0, 0), // 09:00 EST = 14:00 UTC
                utc_ms(2026, 3, 8, 13, 0, 0), // 09:00 EDT = 13:00 UTC: 23 h later
                utc_ms(2026, 3, 9, 13, 0, 0),
            ]
        );
        let got = slots(&s, utc_ms(2026, 10, 31, 12, 0, 0), 2);
        assert_eq!(
            got,
            vec![
                utc_ms(2026, 10, 31, 13, 0, 0), // EDT
                utc_ms(2026, 11, 1, 14, 0, 0),  // EST: 25 h later
            ]
        );
    }

    #[test]
    fn a_time_in_the_spring_gap_fires_once_right_after_it() {
        // 02:30 does not exist in New York on 2026-03-08.
        let s = Schedule::cron("0 30 2 * * ?", "America/New_York").unwrap();
        let got = slots(&s, utc_ms(2026, 3, 7, 0, 0, 0), 3);
        assert_eq!(
            got,
            vec![
                utc_ms(2026, 3, 7, 7, 30, 0), // 02:30 EST
                utc_ms(2026, 3, 8, 7, 0, 0),  // 03:00 EDT, the first instant after the gap
                utc_ms(2026, 3, 9, 6, 30, 0), // 02:30 EDT
            ]
        );
    }

    #[test]
    fn the_repeated_autumn_hour_fires_each_wall_clock_time_once() {
        // 01:00-01:59 happens twice in New York on 2026-11-01 (EDT, then EST).
        let s = Schedule::cron("0 0/30 * * * ?", "America/New_York").unwrap();
        let got = slots(&s, utc_ms(2026, 11, 1, 4, 45, 0), 4); // 00:45 EDT
        assert_eq!(
            got,
            vec![
                utc_ms(2026, 11, 1, 5, 0, 0),  // 01:00 EDT
                utc_ms(2026, 11, 1, 5, 30, 0), // 01:30 EDT
                utc_ms(2026, 11, 1, 7, 0, 0),  // 02:00 EST (01:xx EST not repeated)
                utc_ms(2026, 11, 1, 7, 30, 0),
            ]
        );
        // A job scheduled during the second pass takes its slots there, never earlier.
        let in_second_pass = utc_ms(2026, 11, 1, 6, 10, 0); // 01:10 EST
        assert_eq!(
            s.first_after(in_second_pass).unwrap(),
            Some(utc_ms(2026, 11, 1, 6, 30, 0)) // 01:30 EST
        );
        // No slot is ever repeated across the whole day, in any zone we care about.
        for zone in ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe"] {
            let s = Schedule::cron("0 0/10 * * * ?", zone).unwrap();
            let all = slots(&s, utc_ms(2026, 3, 1, 0, 0, 0), 12_000);
            assert!(all.windows(2).all(|w| w[0] < w[1]), "{zone}");
        }
    }
}
