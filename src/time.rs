//! Time handling: CF time units, user timestamps, target time steps, the cube's time axis and the mapping
//! of source time steps onto target steps.
//!
//! Instants are whole seconds since 1970-01-01T00:00:00 UTC on the proleptic Gregorian calendar: whole
//! seconds are fine enough for Earth-observation time stamps and keep every comparison exact.

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate};

/// Seconds since 1970-01-01T00:00:00 UTC on the proleptic Gregorian calendar.
pub type Instant = i64;

const SECONDS_PER_DAY: i64 = 86_400;
/// chrono's day number (0001-01-01 is day 1) of 1970-01-01.
const UNIX_EPOCH_DAYS_FROM_CE: i64 = 719_163;
/// Julian day number minus chrono's day number, to move Julian-calendar dates onto chrono's scale.
const JDN_MINUS_DAYS_FROM_CE: i64 = 1_721_425;
/// Upper bound on axis length, so that a typo in a range or step cannot exhaust memory.
const MAX_AXIS_STEPS: usize = 10_000_000;
/// Cumulative day counts at the start of each month (and the year length) for the 365-day calendar.
const NOLEAP_CUMULATIVE: [i64; 13] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334, 365];
/// Cumulative day counts at the start of each month (and the year length) for the 366-day calendar.
const ALL_LEAP_CUMULATIVE: [i64; 13] = [0, 31, 60, 91, 121, 152, 182, 213, 244, 274, 305, 335, 366];

/// Errors from parsing or converting times; each carries the offending text so users can find it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// CF time units that cannot be understood.
    #[error("invalid CF time units {units:?}: {reason}")]
    InvalidUnits {
        /// The units attribute as found.
        units: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A calendar this crate does not implement.
    #[error(
        "unsupported calendar {0:?}: expected standard, gregorian, proleptic_gregorian, noleap, 365_day, \
         all_leap, 366_day, 360_day or julian"
    )]
    UnsupportedCalendar(String),
    /// A date or timestamp that cannot be parsed or does not exist.
    #[error(
        "invalid date or timestamp {0:?}: expected e.g. \"2019-03-01\", \"2019-03-01 06:30\", \
         \"2019-03-01T00:00:00Z\" or \"2019-03-01T00:00:00+02:00\""
    )]
    InvalidDate(String),
    /// A date and time with a fraction of a second, which the time axis (whole seconds) cannot hold.
    #[error("{0:?}: times are whole seconds; a fraction of a second would be rounded away")]
    FractionOfSecond(String),
    /// A time step that cannot be parsed, or is zero or negative.
    #[error(
        "invalid time step {0:?}: expected a positive whole count and a unit, e.g. \"1h\", \"30min\", \
         \"1d\", \"1w\", \"1mo\", or ISO 8601 \"PT1H\", \"P1D\", \"P1M\""
    )]
    InvalidStep(String),
    /// A time step with the unit "M", which means minutes to some users and months to others.
    #[error(
        "ambiguous time step {0:?}: \"M\" may mean minutes or months; write \"min\" for minutes or \"mo\" \
         for months"
    )]
    AmbiguousStep(String),
    /// A time coordinate value that does not give a representable instant.
    #[error("time value {value} cannot be converted to an instant: {reason}")]
    InvalidValue {
        /// The value as found.
        value: f64,
        /// What is wrong with it.
        reason: String,
    },
    /// A time range that is empty or too long.
    #[error("invalid time range: {0}")]
    InvalidRange(String),
}

/// CF calendars. Serialized with their CF names, so the output can be fed back to [`Calendar::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Calendar {
    /// Gregorian calendar ("standard", "gregorian", "`proleptic_gregorian`", or no calendar attribute).
    Standard,
    /// 365-day years ("noleap", "`365_day`").
    #[serde(rename = "noleap")]
    NoLeap,
    /// 366-day years ("`all_leap`", "`366_day`").
    AllLeap,
    /// Twelve 30-day months ("`360_day`").
    #[serde(rename = "360_day")]
    Day360,
    /// The Julian calendar throughout: every fourth year a leap year ("julian").
    Julian,
}

impl Calendar {
    /// Parses a CF calendar attribute, case-insensitively; absent or empty means the standard calendar.
    ///
    /// # Errors
    /// [`TimeError::UnsupportedCalendar`] for unknown names.
    pub fn parse(name: Option<&str>) -> Result<Calendar, TimeError> {
        let Some(raw) = name else { return Ok(Calendar::Standard) };
        match raw.trim().to_ascii_lowercase().as_str() {
            "" | "standard" | "gregorian" | "proleptic_gregorian" => Ok(Calendar::Standard),
            "noleap" | "no_leap" | "365_day" => Ok(Calendar::NoLeap),
            "all_leap" | "366_day" => Ok(Calendar::AllLeap),
            "360_day" => Ok(Calendar::Day360),
            "julian" => Ok(Calendar::Julian),
            _ => Err(TimeError::UnsupportedCalendar(raw.to_string())),
        }
    }

    /// Days in `month` (1-based) of `year`; 0 for a month that does not exist, so range checks fail.
    fn month_days(self, year: i64, month: u32) -> u32 {
        let cumulative = match self {
            Calendar::Standard => return gregorian_month_days(year, month),
            Calendar::Day360 => return if (1..=12).contains(&month) { 30 } else { 0 },
            Calendar::Julian => return julian_month_days(year, month),
            Calendar::NoLeap => &NOLEAP_CUMULATIVE,
            Calendar::AllLeap => &ALL_LEAP_CUMULATIVE,
        };
        let m = month as usize;
        match (m.checked_sub(1).and_then(|i| cumulative.get(i)), cumulative.get(m)) {
            (Some(start), Some(end)) if m >= 1 => (end - start) as u32,
            _ => 0,
        }
    }

    /// A day count in this calendar, so that day arithmetic is plain integer addition.
    fn day_number(self, year: i64, month: u32, day: u32) -> Option<i64> {
        if !(1..=12).contains(&month) || day == 0 || day > self.month_days(year, month) {
            return None;
        }
        let (year_len, month_start) = match self {
            Calendar::Standard => {
                let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
                return Some(i64::from(date.num_days_from_ce()));
            }
            Calendar::Julian => return Some(julian_day_number(year, month, day) - JDN_MINUS_DAYS_FROM_CE),
            Calendar::NoLeap => (365, NOLEAP_CUMULATIVE[month as usize - 1]),
            Calendar::AllLeap => (366, ALL_LEAP_CUMULATIVE[month as usize - 1]),
            Calendar::Day360 => (360, 30 * (i64::from(month) - 1)),
        };
        year.checked_mul(year_len)?.checked_add(month_start + i64::from(day) - 1)
    }

    /// Inverse of [`Calendar::day_number`].
    fn date_of_day_number(self, n: i64) -> Option<(i64, u32, u32)> {
        let cumulative = match self {
            Calendar::Standard => {
                let date = NaiveDate::from_num_days_from_ce_opt(i32::try_from(n).ok()?)?;
                return Some((i64::from(date.year()), date.month(), date.day()));
            }
            Calendar::Day360 => {
                let rest = n.rem_euclid(360);
                return Some((n.div_euclid(360), (rest / 30 + 1) as u32, (rest % 30 + 1) as u32));
            }
            Calendar::Julian => return Some(julian_date(n.checked_add(JDN_MINUS_DAYS_FROM_CE)?)),
            Calendar::NoLeap => &NOLEAP_CUMULATIVE,
            Calendar::AllLeap => &ALL_LEAP_CUMULATIVE,
        };
        let year_len = cumulative[12];
        let rest = n.rem_euclid(year_len);
        let month0 = cumulative.iter().rposition(|&start| start <= rest)?.min(11);
        Some((n.div_euclid(year_len), month0 as u32 + 1, (rest - cumulative[month0] + 1) as u32))
    }
}

/// Parsed CF time units (`<unit> since <reference>`) plus calendar.
#[derive(Debug, Clone, PartialEq)]
pub struct CfTime {
    /// Length of one unit in seconds.
    pub unit_seconds: i64,
    /// Reference (year, month, day, hour, minute, second) in the calendar, shifted to UTC when the units
    /// carry a time zone offset. For the standard calendar it is the proleptic Gregorian date, also when
    /// the units gave a pre-1582 date in the Julian part of the CF standard calendar.
    pub reference: (i32, u32, u32, u32, u32, f64),
    /// Calendar of the reference date and of the values.
    pub calendar: Calendar,
}

impl CfTime {
    /// Parses CF time units such as "hours since 1900-01-01 00:00:0.0" with an optional calendar attribute.
    ///
    /// With the "standard"/"gregorian" calendar (or none), a reference date before 1582-10-15 is a Julian
    /// calendar date as CF and cftime read it (e.g. NCEP's "hours since 1-1-1 00:00:0.0"); with
    /// "`proleptic_gregorian`" it is Gregorian.
    ///
    /// # Errors
    /// [`TimeError::UnsupportedCalendar`] for an unknown calendar, [`TimeError::InvalidUnits`] for unknown or
    /// calendar-dependent units ("months since", "years since") and for a malformed or non-existent
    /// reference date.
    pub fn parse(units: &str, calendar: Option<&str>) -> Result<CfTime, TimeError> {
        let cal = Calendar::parse(calendar)?;
        let bad = |reason: String| TimeError::InvalidUnits { units: units.to_string(), reason };
        let text = units.trim();
        let (word, rest) = text
            .split_once(char::is_whitespace)
            .ok_or_else(|| bad("expected \"<unit> since <reference date>\"".to_string()))?;
        let unit_seconds = cf_unit_seconds(word, cal).map_err(bad)?;
        let rest = rest.trim_start();
        let (since, reference) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if !since.eq_ignore_ascii_case("since") {
            return Err(bad(format!("expected \"since\" after {word:?}, found {since:?}")));
        }
        let reference_text = reference.trim();
        if reference_text.is_empty() {
            return Err(bad("missing reference date after \"since\"".to_string()));
        }
        let julian_before_switch = cal == Calendar::Standard
            && !calendar.is_some_and(|c| c.trim().eq_ignore_ascii_case("proleptic_gregorian"));
        let reference = parse_parts(reference_text)
            .and_then(|parts| normalize_reference(&parts, cal, julian_before_switch))
            .map_err(|why| bad(format!("reference date {reference_text:?}: {why}")))?;
        Ok(CfTime { unit_seconds, reference, calendar: cal })
    }

    /// Converts an offset (in `unit`s, may be fractional) to an Instant. Dates of non-standard calendars are
    /// mapped to the Gregorian date with the same year/month/day, clamping the day to the month length
    /// (`360_day` Feb 30 -> Feb 28/29), keeping the time of day, so that each source step lands on the day
    /// its producer meant. Rounded to the nearest second.
    ///
    /// # Errors
    /// [`TimeError::InvalidValue`] for a non-finite value or one whose date lies outside chrono's range.
    pub fn to_instant(&self, value: f64) -> Result<Instant, TimeError> {
        let invalid = |reason: &str| TimeError::InvalidValue { value, reason: reason.to_string() };
        if !value.is_finite() {
            return Err(invalid("not a finite number"));
        }
        let (year, month, day, hour, minute, second) = self.reference;
        let out_of_range = || invalid("the date is outside the supported range");
        let reference_day = self
            .calendar
            .day_number(i64::from(year), month, day)
            .ok_or_else(|| invalid("invalid reference date"))?;
        let time_of_day = f64::from(hour) * 3600.0 + f64::from(minute) * 60.0 + second;
        let seconds = (value * self.unit_seconds as f64 + time_of_day).round();
        // 1e16 s is far beyond chrono's ±262,000 years, and safely inside i64.
        if !seconds.is_finite() || seconds.abs() >= 1e16 {
            return Err(out_of_range());
        }
        let seconds = seconds as i64;
        let day_number =
            reference_day.checked_add(seconds.div_euclid(SECONDS_PER_DAY)).ok_or_else(out_of_range)?;
        let (y, m, d) = self.calendar.date_of_day_number(day_number).ok_or_else(out_of_range)?;
        let d = d.min(gregorian_month_days(y, m));
        instant_from_civil(y, m, d, seconds.rem_euclid(SECONDS_PER_DAY)).ok_or_else(out_of_range)
    }
}

/// Seconds per CF time unit word. Months and years are refused because CF defines them as fractions of a
/// tropical year, which is never what a file's producer meant, except where cftime (and so xarray) reads
/// them as whole days: months of the `360_day` calendar (30 days), common years of `noleap` (365).
fn cf_unit_seconds(word: &str, calendar: Calendar) -> Result<i64, String> {
    let lower = word.to_ascii_lowercase();
    match (lower.as_str(), calendar) {
        ("month" | "months", Calendar::Day360) => return Ok(30 * SECONDS_PER_DAY),
        ("common_year" | "common_years", Calendar::NoLeap) => return Ok(365 * SECONDS_PER_DAY),
        _ => {}
    }
    match lower.as_str() {
        "second" | "seconds" | "sec" | "secs" | "s" => Ok(1),
        "minute" | "minutes" | "min" | "mins" => Ok(60),
        "hour" | "hours" | "hr" | "hrs" | "h" => Ok(3600),
        "day" | "days" | "d" => Ok(SECONDS_PER_DAY),
        "week" | "weeks" => Ok(7 * SECONDS_PER_DAY),
        "month" | "months" | "year" | "years" | "yr" | "yrs" | "common_year" | "common_years" => {
            Err(format!(
                "{word:?} is ambiguous: CF months and years are fractions of a tropical year, not calendar \
             months or years (except months of the 360_day calendar, common years of noleap); convert the \
             values to days"
            ))
        }
        _ => Err(format!(
            "unknown time unit {word:?}: expected seconds, minutes, hours, days or weeks (or an abbreviation)"
        )),
    }
}

/// Date and time fields as written, before any calendar is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Parts {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: f64,
    /// Time zone offset east of UTC in seconds.
    offset: i64,
}

impl Parts {
    /// Checks the time of day, which is the same in every calendar.
    fn check_time(&self) -> Result<(), String> {
        if self.hour > 23 {
            return Err(format!("hour {} is out of range", self.hour));
        }
        if self.minute > 59 {
            return Err(format!("minute {} is out of range", self.minute));
        }
        if !(0.0..60.0).contains(&self.second) {
            return Err(format!("second {} is out of range", self.second));
        }
        Ok(())
    }

    /// Checks the date against month lengths from `month_days`.
    fn check_date(&self, month_days: impl Fn(i64, u32) -> u32) -> Result<(), String> {
        if !(1..=12).contains(&self.month) {
            return Err(format!("month {} is out of range", self.month));
        }
        if self.day == 0 || self.day > month_days(self.year, self.month) {
            return Err(format!("day {} does not exist in {}-{:02}", self.day, self.year, self.month));
        }
        Ok(())
    }

    /// Seconds from the start of the day, without the fraction of a second.
    fn whole_seconds_of_day(&self) -> i64 {
        i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + self.second.floor() as i64
    }
}

/// A byte cursor for the small hand-written date grammar (chrono's parsers reject 1-digit fields).
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Self {
        Cursor { bytes: text.as_bytes(), pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn rest(&self) -> String {
        String::from_utf8_lossy(self.bytes.get(self.pos..).unwrap_or_default()).into_owned()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        if found {
            self.pos += 1;
        }
        found
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let end = self.pos + word.len();
        let found = self.bytes.get(self.pos..end).is_some_and(|b| b.eq_ignore_ascii_case(word.as_bytes()));
        if found {
            self.pos = end;
        }
        found
    }

    fn skip_whitespace(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
        self.pos > start
    }

    fn count_digits(&self) -> usize {
        self.bytes.get(self.pos..).unwrap_or_default().iter().take_while(|b| b.is_ascii_digit()).count()
    }

    /// Reads 1 to `max_digits` digits; returns the value and the number of digits.
    fn number(&mut self, max_digits: usize) -> Option<(u32, usize)> {
        let count = self.count_digits();
        if count == 0 || count > max_digits {
            return None;
        }
        let text = std::str::from_utf8(self.bytes.get(self.pos..self.pos + count)?).ok()?;
        self.pos += count;
        Some((text.parse().ok()?, count))
    }

    /// Reads seconds with an optional fraction, e.g. "0.0" or "05.250".
    fn seconds(&mut self) -> Option<f64> {
        let start = self.pos;
        self.number(2)?;
        if self.eat(b'.') {
            self.pos += self.count_digits();
        }
        std::str::from_utf8(self.bytes.get(start..self.pos)?).ok()?.parse().ok()
    }
}

/// Parses `Y-M-D[(T| )H[:M[:S[.f]]]][Z|UTC|GMT|±H[H][[:]MM]]` with 1-2 digit fields, as found in CF units
/// and typed by users.
fn parse_parts(text: &str) -> Result<Parts, String> {
    let mut c = Cursor::new(text.trim());
    let negative = c.eat(b'-');
    if !negative {
        c.eat(b'+');
    }
    let (year, _) = c.number(6).ok_or("expected a year of 1 to 6 digits")?;
    if !c.eat(b'-') {
        return Err("expected '-' after the year".to_string());
    }
    let (month, _) = c.number(2).ok_or("expected a month of 1 or 2 digits")?;
    if !c.eat(b'-') {
        return Err("expected '-' after the month".to_string());
    }
    let (day, _) = c.number(2).ok_or("expected a day of 1 or 2 digits")?;
    let year = if negative { -i64::from(year) } else { i64::from(year) };
    let mut parts = Parts { year, month, day, hour: 0, minute: 0, second: 0.0, offset: 0 };
    let t_separator = c.eat(b'T') || c.eat(b't');
    let space_separator = c.skip_whitespace();
    if (t_separator || space_separator) && c.peek().is_some_and(|b| b.is_ascii_digit()) {
        parts.hour = c.number(2).ok_or("expected an hour of 1 or 2 digits")?.0;
        if c.eat(b':') {
            parts.minute = c.number(2).ok_or("expected minutes of 1 or 2 digits")?.0;
            if c.eat(b':') {
                parts.second = c.seconds().ok_or("expected seconds such as \"00\" or \"0.0\"")?;
            }
        }
    } else if t_separator {
        return Err("expected a time after 'T'".to_string());
    }
    c.skip_whitespace();
    parts.offset = parse_zone(&mut c)?;
    c.skip_whitespace();
    if !c.at_end() {
        return Err(format!("unexpected text {:?}", c.rest()));
    }
    Ok(parts)
}

/// Parses an optional time zone: "Z", "UTC", "GMT" or a numeric offset such as "+00:00", "+0", "-0500".
/// Returns the offset east of UTC in seconds; unknown text is left for the caller to reject.
fn parse_zone(c: &mut Cursor<'_>) -> Result<i64, String> {
    let named = c.eat(b'Z') || c.eat(b'z') || c.eat_word("UTC") || c.eat_word("GMT");
    let sign = if c.eat(b'+') {
        1
    } else if c.eat(b'-') {
        -1
    } else {
        return Ok(0);
    };
    if named {
        c.skip_whitespace();
    }
    let (value, digits) = c.number(4).ok_or("expected a time zone offset such as \"+00:00\"")?;
    let (hours, minutes) = if digits <= 2 {
        let minutes = if c.eat(b':') { c.number(2).ok_or("expected offset minutes")?.0 } else { 0 };
        (value, minutes)
    } else {
        (value / 100, value % 100)
    };
    if hours > 23 || minutes > 59 {
        return Err(format!("time zone offset {hours}:{minutes:02} is out of range"));
    }
    Ok(sign * (i64::from(hours) * 3600 + i64::from(minutes) * 60))
}

/// Validates a CF reference date in `calendar` and shifts it to UTC. With `julian_before_switch`, dates
/// before 1582-10-15 are Julian calendar dates (CF's standard calendar) and come out as proleptic Gregorian.
fn normalize_reference(
    parts: &Parts,
    calendar: Calendar,
    julian_before_switch: bool,
) -> Result<(i32, u32, u32, u32, u32, f64), String> {
    parts.check_time()?;
    let date = (parts.year, parts.month, parts.day);
    let day_number = if julian_before_switch && date < (1582, 10, 15) {
        if date >= (1582, 10, 5) {
            return Err("1582-10-05 to 1582-10-14 do not exist in the standard calendar".to_string());
        }
        parts.check_date(julian_month_days)?;
        julian_day_number(parts.year, parts.month, parts.day) - JDN_MINUS_DAYS_FROM_CE
    } else {
        parts.check_date(|y, m| calendar.month_days(y, m))?;
        calendar
            .day_number(parts.year, parts.month, parts.day)
            .ok_or("the date is outside the supported range")?
    };
    let fraction = parts.second - parts.second.floor();
    let seconds = parts.whole_seconds_of_day() - parts.offset;
    let day_number = day_number + seconds.div_euclid(SECONDS_PER_DAY);
    let seconds = seconds.rem_euclid(SECONDS_PER_DAY);
    let (year, month, day) =
        calendar.date_of_day_number(day_number).ok_or("the date is outside the supported range")?;
    let year = i32::try_from(year).map_err(|_| "the year is outside the supported range")?;
    let (hour, minute) = ((seconds / 3600) as u32, (seconds % 3600 / 60) as u32);
    Ok((year, month, day, hour, minute, (seconds % 60) as f64 + fraction))
}

/// Parses a user timestamp: "2019-03-01", "2019-03-01T00:00:00Z", "2019-03-01 06:30",
/// "2019-03-01T00:00:00+02:00". No time zone means UTC.
///
/// # Errors
/// [`TimeError::InvalidDate`] for malformed text or a date that does not exist;
/// [`TimeError::FractionOfSecond`] for a time with a fraction of a second (`00:00:00.5`).
pub fn parse_timestamp(text: &str) -> Result<Instant, TimeError> {
    let invalid = || TimeError::InvalidDate(text.to_string());
    let parts = parse_parts(text).map_err(|_| invalid())?;
    parts.check_time().map_err(|_| invalid())?;
    parts.check_date(gregorian_month_days).map_err(|_| invalid())?;
    if parts.second.fract() != 0.0 {
        return Err(TimeError::FractionOfSecond(text.to_string()));
    }
    let seconds = parts.whole_seconds_of_day();
    instant_from_civil(parts.year, parts.month, parts.day, seconds - parts.offset).ok_or_else(invalid)
}

/// ISO 8601 text "2019-03-01T00:00:00Z", the form users type back into [`parse_timestamp`].
#[must_use]
pub fn format_instant(t: Instant) -> String {
    match DateTime::from_timestamp(t, 0) {
        Some(time) => time.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => format!("{t} seconds since 1970-01-01T00:00:00Z"),
    }
}

/// A target time step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A fixed number of seconds.
    Seconds(i64),
    /// Calendar months, whose length varies.
    Months(u32),
}

impl Step {
    /// "1h", "6H", "30min", "1d", "1D", "10s", "1w", "1mo", "3months", ISO "PT1H", "P1D", "PT30M", "P1M"
    /// (months), "P1W". A missing count means 1 ("h"); units are case-insensitive; "y"/"yr"/"P1Y" are
    /// 12 months.
    ///
    /// # Errors
    /// [`TimeError::InvalidStep`] for unknown units, fractions, zero or negative steps and ISO durations
    /// mixing months with days or hours; [`TimeError::AmbiguousStep`] for a bare "M"/"m" ("1M"), which some
    /// tools read as minutes and others as months.
    pub fn parse(text: &str) -> Result<Step, TimeError> {
        let trimmed = text.trim();
        let invalid = || TimeError::InvalidStep(text.to_string());
        if trimmed.starts_with(['P', 'p']) {
            return parse_iso_duration(trimmed).ok_or_else(invalid);
        }
        let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split);
        let count: u64 = if digits.is_empty() { 1 } else { digits.parse().map_err(|_| invalid())? };
        let unit = unit.trim().to_ascii_lowercase();
        let step = match unit.as_str() {
            "m" => return Err(TimeError::AmbiguousStep(text.to_string())),
            "s" | "sec" | "secs" | "second" | "seconds" => seconds_step(count, 1),
            "min" | "mins" | "minute" | "minutes" => seconds_step(count, 60),
            "h" | "hr" | "hrs" | "hour" | "hours" => seconds_step(count, 3600),
            "d" | "day" | "days" => seconds_step(count, SECONDS_PER_DAY),
            "w" | "wk" | "wks" | "week" | "weeks" => seconds_step(count, 7 * SECONDS_PER_DAY),
            "mo" | "mon" | "mons" | "month" | "months" => months_step(count, 1),
            "y" | "yr" | "yrs" | "year" | "years" => months_step(count, 12),
            _ => None,
        };
        step.ok_or_else(invalid)
    }

    /// Adds `n` steps to `t` (months: calendar months from t, day clamped to month length). Saturates at
    /// the ends of the representable range instead of overflowing.
    #[must_use]
    pub fn advance(self, t: Instant, n: i64) -> Instant {
        if n == 0 {
            return t;
        }
        match self {
            Step::Seconds(seconds) => t.saturating_add(seconds.saturating_mul(n)),
            Step::Months(months) => {
                let total = i64::from(months).saturating_mul(n);
                add_months(t, total).unwrap_or(if total >= 0 { Instant::MAX } else { Instant::MIN })
            }
        }
    }
}

impl fmt::Display for Step {
    /// Canonical short form ("1h", "30min", "1d", "1mo", "90s") that [`Step::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Step::Months(months) => write!(f, "{months}mo"),
            Step::Seconds(0) => write!(f, "0s"),
            Step::Seconds(s) if s % SECONDS_PER_DAY == 0 => write!(f, "{}d", s / SECONDS_PER_DAY),
            Step::Seconds(s) if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            Step::Seconds(s) if s % 60 == 0 => write!(f, "{}min", s / 60),
            Step::Seconds(s) => write!(f, "{s}s"),
        }
    }
}

/// `count` units of `unit_seconds`, or None when zero or overflowing.
fn seconds_step(count: u64, unit_seconds: i64) -> Option<Step> {
    let seconds = i64::try_from(count).ok()?.checked_mul(unit_seconds)?;
    (seconds > 0).then_some(Step::Seconds(seconds))
}

/// `count` units of `unit_months`, or None when zero or overflowing.
fn months_step(count: u64, unit_months: u32) -> Option<Step> {
    let months = u32::try_from(count).ok()?.checked_mul(unit_months)?;
    (months > 0).then_some(Step::Months(months))
}

/// Parses an ISO 8601 duration `P[nY][nM][nW][nD][T[nH][nM][nS]]` that is either whole months or whole
/// seconds; a mix has no single length and is refused.
fn parse_iso_duration(text: &str) -> Option<Step> {
    let upper = text.to_ascii_uppercase();
    let mut rest = upper.strip_prefix('P')?;
    let (mut months, mut seconds) = (0u64, 0u64);
    let (mut in_time, mut rank, mut time_fields) = (false, 0, 0);
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('T') {
            if in_time {
                return None;
            }
            in_time = true;
            rest = after;
            continue;
        }
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let value: u64 = rest.get(..digits)?.parse().ok()?;
        let designator = rest.get(digits..)?.chars().next()?;
        let (field_rank, per_month, per_second) = match (in_time, designator) {
            (false, 'Y') => (1, 12, 0),
            (false, 'M') => (2, 1, 0),
            (false, 'W') => (3, 0, 7 * 86_400),
            (false, 'D') => (4, 0, 86_400),
            (true, 'H') => (5, 0, 3600),
            (true, 'M') => (6, 0, 60),
            (true, 'S') => (7, 0, 1),
            _ => return None,
        };
        if field_rank <= rank {
            return None;
        }
        rank = field_rank;
        time_fields += usize::from(in_time);
        months = months.checked_add(value.checked_mul(per_month)?)?;
        seconds = seconds.checked_add(value.checked_mul(per_second)?)?;
        rest = rest.get(digits + 1..)?;
    }
    if in_time && time_fields == 0 {
        return None;
    }
    match (months, seconds) {
        (0, 0) => None,
        (months, 0) => months_step(months, 1),
        (0, seconds) => seconds_step(seconds, 1),
        _ => None,
    }
}

/// The cube's time axis: sorted strictly increasing instants.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeAxis {
    /// The instants, strictly increasing.
    pub times: Vec<Instant>,
    /// The step between consecutive instants; None when irregular.
    pub step: Option<Step>,
}

impl TimeAxis {
    /// start..=end every step (end inclusive when it falls on a step). Monthly steps count from `start`,
    /// so Jan 31 is followed by Feb 28 (29) and then Mar 31.
    ///
    /// # Errors
    /// [`TimeError::InvalidRange`] when end < start or the axis would have more than 10,000,000 steps;
    /// [`TimeError::InvalidStep`] for a zero or negative step.
    pub fn regular(start: Instant, end: Instant, step: Step) -> Result<TimeAxis, TimeError> {
        if end < start {
            return Err(TimeError::InvalidRange(format!(
                "end {} is before start {}",
                format_instant(end),
                format_instant(start)
            )));
        }
        let too_many = || {
            TimeError::InvalidRange(format!(
                "{} to {} every {step} has more than {MAX_AXIS_STEPS} steps",
                format_instant(start),
                format_instant(end)
            ))
        };
        let span = i128::from(end) - i128::from(start);
        let times = match step {
            Step::Seconds(seconds) if seconds <= 0 => return Err(TimeError::InvalidStep(step.to_string())),
            Step::Months(0) => return Err(TimeError::InvalidStep(step.to_string())),
            Step::Seconds(seconds) => {
                let count = span / i128::from(seconds) + 1;
                if count > MAX_AXIS_STEPS as i128 {
                    return Err(too_many());
                }
                // start + i * seconds <= end for every i < count, so nothing overflows.
                (0..count as i64).map(|i| start + i * seconds).collect()
            }
            Step::Months(months) => {
                // Months are at most 31 days long: refuse hopeless ranges before allocating.
                if span / (i128::from(months) * 31 * i128::from(SECONDS_PER_DAY)) >= MAX_AXIS_STEPS as i128 {
                    return Err(too_many());
                }
                let mut times = Vec::new();
                loop {
                    let t = step.advance(start, times.len() as i64);
                    if t > end || times.last().is_some_and(|&last| t <= last) {
                        break;
                    }
                    if times.len() == MAX_AXIS_STEPS {
                        return Err(too_many());
                    }
                    times.push(t);
                }
                times
            }
        };
        Ok(TimeAxis { times, step: Some(step) })
    }

    /// From a source's instants: sorted, duplicates removed; step = Some if all spacings are equal
    /// (seconds), or if the instants are whole calendar months apart counted from the first one.
    #[must_use]
    pub fn from_instants(times: &[Instant]) -> TimeAxis {
        let mut times = times.to_vec();
        times.sort_unstable();
        times.dedup();
        let step = detect_step(&times);
        TimeAxis { times, step }
    }

    /// Number of time steps.
    #[must_use]
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether the axis has no time step.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Interval [start, end) of step i: end = next time; for the last step: start + step (regular), or +
    /// the last spacing (irregular, >1 steps), or +1 s (single instant).
    ///
    /// # Panics
    /// When `i >= self.len()`, like slice indexing.
    #[must_use]
    pub fn interval(&self, i: usize) -> (Instant, Instant) {
        let start = self.times[i];
        let end = match self.times.get(i + 1) {
            Some(&next) => next,
            None => self.beyond_last(1),
        };
        (start, end)
    }

    /// Extends the axis by `n` padding steps after the last one, continuing the step (or the last spacing,
    /// or 1 s). Returns the whole axis followed by the padding (`len() + n` instants), ready to be stored as
    /// the time coordinate; an empty axis stays empty, as there is nothing to continue.
    #[must_use]
    pub fn padded(&self, n: usize) -> Vec<Instant> {
        if self.times.is_empty() {
            return Vec::new();
        }
        let mut times = self.times.clone();
        times.extend((1..=n).map(|k| self.beyond_last(k)));
        times
    }

    /// The instant `k` steps after the last one. Monthly axes count from the first instant when it is
    /// their origin, so the day of month does not drift after a short month.
    fn beyond_last(&self, k: usize) -> Instant {
        let (Some(&first), Some(&last)) = (self.times.first(), self.times.last()) else { return 0 };
        let k = k as i64;
        match self.step {
            Some(step @ Step::Months(_)) => {
                let last_index = self.times.len() as i64 - 1;
                if step.advance(first, last_index) == last {
                    step.advance(first, last_index.saturating_add(k))
                } else {
                    step.advance(last, k)
                }
            }
            Some(Step::Seconds(seconds)) => last.saturating_add(seconds.saturating_mul(k)),
            None => match self.times.len() {
                0 | 1 => last.saturating_add(k),
                len => last.saturating_add(last.saturating_sub(self.times[len - 2]).saturating_mul(k)),
            },
        }
    }

    /// Picks the CF unit for storing the axis as int64: the largest of days/hours/minutes/seconds that
    /// divides every value (and the padded ones passed in), so the stored numbers stay small and exact;
    /// returns (`unit_seconds`, "hours since 1970-01-01 00:00:00").
    #[must_use]
    pub fn cf_units(times: &[Instant]) -> (i64, String) {
        let units = [(SECONDS_PER_DAY, "days"), (3600, "hours"), (60, "minutes")];
        let (unit_seconds, name) = units
            .into_iter()
            .find(|&(unit, _)| times.iter().all(|t| t.rem_euclid(unit) == 0))
            .unwrap_or((1, "seconds"));
        (unit_seconds, format!("{name} since 1970-01-01 00:00:00"))
    }
}

/// The common step of sorted unique instants, if any.
fn detect_step(times: &[Instant]) -> Option<Step> {
    let (&first, &second) = (times.first()?, times.get(1)?);
    let spacing = second.checked_sub(first)?;
    if times.windows(2).all(|w| w[1].checked_sub(w[0]) == Some(spacing)) {
        return Some(Step::Seconds(spacing));
    }
    let (date0, _) = civil_from_instant(first)?;
    let (date1, _) = civil_from_instant(second)?;
    let months = (i64::from(date1.year()) * 12 + i64::from(date1.month0()))
        - (i64::from(date0.year()) * 12 + i64::from(date0.month0()));
    let step = Step::Months(u32::try_from(months).ok().filter(|&m| m > 0)?);
    times.iter().enumerate().all(|(i, &t)| step.advance(first, i as i64) == t).then_some(step)
}

/// How source steps map onto target steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepSources {
    /// Source steps whose instant lies in the target interval: aggregate them (mean/sum/min/max/...).
    Aggregate(Vec<usize>),
    /// No source step in the interval: the nearest source step(s) in time (all that share the nearest
    /// instant), when within tolerance.
    Nearest(Vec<usize>),
    /// Nothing close enough: the step stays empty (NaN).
    Empty,
}

/// For each target step, which source steps (indices into `source`, which need not be sorted and may
/// contain duplicates) feed it.
///
/// Rule: steps inside [start, end) of the target interval -> Aggregate. Otherwise the source step(s)
/// nearest to the interval midpoint, if that distance <= max(median spacing of the sorted unique source
/// instants, interval length) / 2 -> Nearest (the earlier instant on a tie); else Empty. A single-instant
/// source has spacing 0. Indices within a list are ordered by instant, then index. Sorts once and binary
/// searches per target step: O((n + m) log n).
#[must_use]
pub fn map_steps(target: &TimeAxis, source: &[Instant]) -> Vec<StepSources> {
    // Source indices ordered by instant (stable, so equal instants keep index order), grouped by instant.
    let mut order: Vec<usize> = (0..source.len()).collect();
    order.sort_by_key(|&i| source[i]);
    let mut unique: Vec<Instant> = Vec::new();
    let mut group_start: Vec<usize> = Vec::new();
    for (position, &i) in order.iter().enumerate() {
        if unique.last() != Some(&source[i]) {
            unique.push(source[i]);
            group_start.push(position);
        }
    }
    group_start.push(order.len());
    let indices = |from: usize, to: usize| order[group_start[from]..group_start[to]].to_vec();

    // Twice the median spacing, so that an even count's median stays an integer.
    let mut spacings: Vec<i128> = unique.windows(2).map(|w| i128::from(w[1]) - i128::from(w[0])).collect();
    spacings.sort_unstable();
    let median_x2 = match spacings.len() {
        0 => 0,
        n if n % 2 == 1 => 2 * spacings[n / 2],
        n => spacings[n / 2 - 1] + spacings[n / 2],
    };

    (0..target.len())
        .map(|i| {
            let (start, end) = target.interval(i);
            let lo = unique.partition_point(|&t| t < start);
            let hi = unique.partition_point(|&t| t < end);
            if lo < hi {
                return StepSources::Aggregate(indices(lo, hi));
            }
            // Distances are doubled so the midpoint stays an integer.
            let mid_x2 = i128::from(start) + i128::from(end);
            let distance_x2 = |k: usize| (2 * i128::from(unique[k]) - mid_x2).abs();
            let nearest = match (lo.checked_sub(1), (lo < unique.len()).then_some(lo)) {
                (Some(before), Some(after)) => {
                    if distance_x2(after) < distance_x2(before) {
                        after
                    } else {
                        before
                    }
                }
                (Some(before), None) => before,
                (None, Some(after)) => after,
                (None, None) => return StepSources::Empty,
            };
            let length_x2 = 2 * (i128::from(end) - i128::from(start));
            if 2 * distance_x2(nearest) <= median_x2.max(length_x2) {
                StepSources::Nearest(indices(nearest, nearest + 1))
            } else {
                StepSources::Empty
            }
        })
        .collect()
}

/// Gregorian leap-year rule.
fn is_gregorian_leap(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

/// Days in a Gregorian month; 0 for a month that does not exist.
fn gregorian_month_days(year: i64, month: u32) -> u32 {
    match month {
        2 if is_gregorian_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => 0,
    }
}

/// Days in a Julian-calendar month (every fourth year is a leap year).
fn julian_month_days(year: i64, month: u32) -> u32 {
    if month == 2 && year.rem_euclid(4) == 0 { 29 } else { gregorian_month_days(1, month) }
}

/// Julian day number of a Julian-calendar date.
fn julian_day_number(year: i64, month: u32, day: u32) -> i64 {
    let a = (14 - i64::from(month)) / 12;
    let y = year + 4800 - a;
    let m = i64::from(month) + 12 * a - 3;
    i64::from(day) + (153 * m + 2) / 5 + 365 * y + y.div_euclid(4) - 32_083
}

/// The Julian-calendar date of a Julian day number (inverse of [`julian_day_number`]).
fn julian_date(jdn: i64) -> (i64, u32, u32) {
    let c = jdn + 32_082;
    let d = (4 * c + 3).div_euclid(1461);
    let e = c - (1461 * d).div_euclid(4);
    let m = (5 * e + 2) / 153;
    let day = e - (153 * m + 2) / 5 + 1;
    let month = m + 3 - 12 * (m / 10);
    (d - 4800 + m / 10, month as u32, day as u32)
}

/// The instant at `seconds` after midnight UTC starting a Gregorian date (seconds may exceed a day).
fn instant_from_civil(year: i64, month: u32, day: u32, seconds: i64) -> Option<Instant> {
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
    let days = i64::from(date.num_days_from_ce()) - UNIX_EPOCH_DAYS_FROM_CE;
    days.checked_mul(SECONDS_PER_DAY)?.checked_add(seconds)
}

/// The Gregorian date of an instant and its seconds after midnight.
fn civil_from_instant(t: Instant) -> Option<(NaiveDate, i64)> {
    let days = t.div_euclid(SECONDS_PER_DAY) + UNIX_EPOCH_DAYS_FROM_CE;
    Some((NaiveDate::from_num_days_from_ce_opt(i32::try_from(days).ok()?)?, t.rem_euclid(SECONDS_PER_DAY)))
}

/// Adds calendar months, clamping the day to the target month's length and keeping the time of day.
fn add_months(t: Instant, months: i64) -> Option<Instant> {
    let (date, seconds) = civil_from_instant(t)?;
    let total = (i64::from(date.year()) * 12 + i64::from(date.month0())).checked_add(months)?;
    let (year, month) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
    instant_from_civil(year, month, date.day().min(gregorian_month_days(year, month)), seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(text: &str) -> Instant {
        parse_timestamp(text).unwrap()
    }

    fn cf(units: &str, calendar: Option<&str>, value: f64) -> String {
        format_instant(CfTime::parse(units, calendar).unwrap().to_instant(value).unwrap())
    }

    #[test]
    fn epoch_constants_match_chrono() {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
        assert_eq!(i64::from(epoch.num_days_from_ce()), UNIX_EPOCH_DAYS_FROM_CE);
        // Julian 1582-10-04 was followed by Gregorian 1582-10-15.
        let switch = NaiveDate::from_ymd_opt(1582, 10, 15).unwrap();
        assert_eq!(
            julian_day_number(1582, 10, 4) + 1 - JDN_MINUS_DAYS_FROM_CE,
            i64::from(switch.num_days_from_ce())
        );
    }

    #[test]
    fn calendar_names() {
        assert_eq!(Calendar::parse(None).unwrap(), Calendar::Standard);
        for name in ["", "standard", "Gregorian", "PROLEPTIC_GREGORIAN", " standard "] {
            assert_eq!(Calendar::parse(Some(name)).unwrap(), Calendar::Standard, "{name}");
        }
        for (name, expected) in [
            ("noleap", Calendar::NoLeap),
            ("365_day", Calendar::NoLeap),
            ("NoLeap", Calendar::NoLeap),
            ("all_leap", Calendar::AllLeap),
            ("366_day", Calendar::AllLeap),
            ("360_day", Calendar::Day360),
        ] {
            assert_eq!(Calendar::parse(Some(name)).unwrap(), expected, "{name}");
        }
        assert_eq!(Calendar::parse(Some("Julian")).unwrap(), Calendar::Julian);
        for name in ["none", "lunar", "julian_day"] {
            assert!(
                matches!(Calendar::parse(Some(name)), Err(TimeError::UnsupportedCalendar(n)) if n == name)
            );
        }
    }

    #[test]
    fn calendar_serializes_to_cf_names() {
        for (calendar, name) in [
            (Calendar::Standard, "standard"),
            (Calendar::NoLeap, "noleap"),
            (Calendar::AllLeap, "all_leap"),
            (Calendar::Day360, "360_day"),
            (Calendar::Julian, "julian"),
        ] {
            assert_eq!(serde_json::to_string(&calendar).unwrap(), format!("\"{name}\""));
            assert_eq!(Calendar::parse(Some(name)).unwrap(), calendar);
        }
    }

    #[test]
    fn cf_units_from_real_files() {
        assert_eq!(cf("hours since 1900-01-01 00:00:0.0", None, 929_190.0), "2006-01-01T06:00:00Z");
        assert_eq!(cf("Hour since 2001-12-31T23:00:00Z", None, 146_396.0), "2018-09-13T19:00:00Z");
        // Checked with Python: datetime(1600, 1, 1) + timedelta(days=113406).
        assert_eq!(cf("days since 1600-1-1 0:0:0", None, 113_406.0), "1910-07-01T00:00:00Z");
        assert_eq!(cf("days since 1950-01-01", Some("gregorian"), 20_000.5), "2004-10-04T12:00:00Z");
        assert_eq!(cf("seconds since 1970-01-01", Some("standard"), 1_551_398_400.0), "2019-03-01T00:00:00Z");
        assert_eq!(cf("minutes since 2000-01-01T00:00:00+00:00", None, 90.0), "2000-01-01T01:30:00Z");
        assert_eq!(cf("weeks since 2000-01-03", None, 1.0), "2000-01-10T00:00:00Z");
        assert_eq!(cf("days since 1970-01-01", None, -1.0), "1969-12-31T00:00:00Z");
        assert_eq!(cf("hours since 2000-01-01", None, -0.5), "1999-12-31T23:30:00Z");
        assert_eq!(cf("  days   since   2000-01-01  ", None, 1.0), "2000-01-02T00:00:00Z");
    }

    #[test]
    fn cf_unit_spellings() {
        let spellings: [(&str, i64); 26] = [
            ("second", 1),
            ("seconds", 1),
            ("sec", 1),
            ("secs", 1),
            ("s", 1),
            ("Seconds", 1),
            ("minute", 60),
            ("minutes", 60),
            ("min", 60),
            ("mins", 60),
            ("MINUTES", 60),
            ("hour", 3600),
            ("hours", 3600),
            ("hr", 3600),
            ("hrs", 3600),
            ("h", 3600),
            ("Hour", 3600),
            ("HOURS", 3600),
            ("day", 86_400),
            ("days", 86_400),
            ("d", 86_400),
            ("Days", 86_400),
            ("week", 604_800),
            ("weeks", 604_800),
            ("Weeks", 604_800),
            ("D", 86_400),
        ];
        for (word, seconds) in spellings {
            let units = format!("{word} since 2000-01-01");
            let parsed = CfTime::parse(&units, None).unwrap();
            assert_eq!(parsed.unit_seconds, seconds, "{units}");
            assert_eq!(parsed.reference, (2000, 1, 1, 0, 0, 0.0));
            assert_eq!(parsed.calendar, Calendar::Standard);
        }
    }

    #[test]
    fn cf_reference_time_zones() {
        assert_eq!(cf("hours since 2000-01-01 00:00:00 -05:00", None, 0.0), "2000-01-01T05:00:00Z");
        assert_eq!(cf("hours since 2000-01-01T00:00+0", None, 1.0), "2000-01-01T01:00:00Z");
        assert_eq!(cf("hours since 2000-01-01T06:00:00+0530", None, 0.0), "2000-01-01T00:30:00Z");
        assert_eq!(cf("hours since 2000-01-01 00:00:00 UTC", None, 0.0), "2000-01-01T00:00:00Z");
        assert_eq!(cf("hours since 2000-01-01 00:00:00Z", None, 0.0), "2000-01-01T00:00:00Z");
        assert_eq!(cf("hours since 2000-01-01 00:00:00 +00:00", None, 0.0), "2000-01-01T00:00:00Z");
        // The offset moves the reference into the previous day, in the file's calendar.
        let parsed = CfTime::parse("days since 2001-01-01 00:00 +06:00", Some("360_day")).unwrap();
        assert_eq!(parsed.reference, (2000, 12, 30, 18, 0, 0.0));
        assert_eq!(format_instant(parsed.to_instant(0.0).unwrap()), "2000-12-30T18:00:00Z");
    }

    #[test]
    fn cf_fractional_reference_and_rounding() {
        let parsed = CfTime::parse("seconds since 2000-01-01 00:00:00.5", None).unwrap();
        assert_eq!(parsed.reference, (2000, 1, 1, 0, 0, 0.5));
        assert_eq!(format_instant(parsed.to_instant(0.4).unwrap()), "2000-01-01T00:00:01Z");
        assert_eq!(format_instant(parsed.to_instant(-0.4).unwrap()), "2000-01-01T00:00:00Z");
        assert_eq!(cf("days since 2000-01-01", None, 1.0 / 3.0), "2000-01-01T08:00:00Z");
        assert_eq!(cf("hours since 2000-01-01", None, 0.000_1), "2000-01-01T00:00:00Z");
    }

    #[test]
    fn cf_360_day() {
        let units = "days since 2001-1-1";
        assert_eq!(cf(units, Some("360_day"), 15.0), "2001-01-16T00:00:00Z");
        assert_eq!(cf(units, Some("360_day"), 15.5), "2001-01-16T12:00:00Z");
        assert_eq!(cf(units, Some("360_day"), 30.0), "2001-02-01T00:00:00Z");
        // 2001-02-30 does not exist in the Gregorian calendar: clamped.
        assert_eq!(cf(units, Some("360_day"), 59.0), "2001-02-28T00:00:00Z");
        assert_eq!(cf(units, Some("360_day"), 58.0), "2001-02-28T00:00:00Z");
        assert_eq!(cf(units, Some("360_day"), 60.0), "2001-03-01T00:00:00Z");
        assert_eq!(cf(units, Some("360_day"), 360.0), "2002-01-01T00:00:00Z");
        assert_eq!(cf(units, Some("360_day"), -1.0), "2000-12-30T00:00:00Z");
        assert_eq!(cf("days since 2004-1-1", Some("360_day"), 59.0), "2004-02-29T00:00:00Z");
        // Feb 30 is a valid reference date in this calendar.
        assert_eq!(cf("days since 2001-02-30", Some("360_day"), 1.0), "2001-03-01T00:00:00Z");
    }

    #[test]
    fn cf_noleap_and_all_leap() {
        for name in ["noleap", "365_day"] {
            assert_eq!(cf("days since 2000-01-01", Some(name), 58.0), "2000-02-28T00:00:00Z");
            assert_eq!(cf("days since 2000-01-01", Some(name), 59.0), "2000-03-01T00:00:00Z");
            assert_eq!(cf("days since 2000-01-01", Some(name), 365.0), "2001-01-01T00:00:00Z");
            assert_eq!(cf("days since 2000-01-01", Some(name), 365.0 * 4.0), "2004-01-01T00:00:00Z");
            assert_eq!(cf("days since 2000-01-01", Some(name), -1.0), "1999-12-31T00:00:00Z");
        }
        for name in ["all_leap", "366_day"] {
            assert_eq!(cf("days since 2001-01-01", Some(name), 58.0), "2001-02-28T00:00:00Z");
            // 2001-02-29 does not exist in the Gregorian calendar: clamped.
            assert_eq!(cf("days since 2001-01-01", Some(name), 59.0), "2001-02-28T00:00:00Z");
            assert_eq!(cf("days since 2001-01-01", Some(name), 60.0), "2001-03-01T00:00:00Z");
            assert_eq!(cf("days since 2001-01-01", Some(name), 366.0), "2002-01-01T00:00:00Z");
            assert_eq!(cf("hours since 2001-02-29 06:00", Some(name), 0.0), "2001-02-28T06:00:00Z");
        }
    }

    #[test]
    fn cf_standard_calendar_is_julian_before_1582() {
        // NCEP reanalysis: 1948-01-01 is 17067072 hours after Julian 0001-01-01 (cftime agrees).
        let parsed = CfTime::parse("hours since 1-1-1 00:00:0.0", None).unwrap();
        assert_eq!(parsed.reference, (0, 12, 30, 0, 0, 0.0));
        assert_eq!(format_instant(parsed.to_instant(17_067_072.0).unwrap()), "1948-01-01T00:00:00Z");
        assert_eq!(cf("hours since 1-1-1 00:00:0.0", Some("standard"), 17_067_072.0), "1948-01-01T00:00:00Z");
        assert_eq!(
            cf("hours since 1-1-1 00:00:0.0", Some("proleptic_gregorian"), 17_067_072.0),
            "1948-01-03T00:00:00Z"
        );
        assert_eq!(cf("days since 1582-10-04", None, 1.0), "1582-10-15T00:00:00Z");
        assert_eq!(cf("days since 1582-10-15", None, 0.0), "1582-10-15T00:00:00Z");
        // Julian leap day that the Gregorian calendar lacks.
        assert_eq!(cf("days since 1500-02-29", None, 0.0), "1500-03-10T00:00:00Z");
        assert!(CfTime::parse("days since 1582-10-10", None).is_err());
        assert!(CfTime::parse("days since 1582-10-10", Some("proleptic_gregorian")).is_ok());
        assert!(CfTime::parse("days since 1500-02-29", Some("proleptic_gregorian")).is_err());
    }

    #[test]
    fn julian_calendar_as_cftime_reads_it() {
        // cftime.num2date(v, "days since 1900-01-01", calendar="julian"); a Julian leap day the Gregorian
        // calendar lacks goes on the month's last day, as other calendars' days past a month's end do.
        for (value, expected) in [
            (0.0, "1900-01-01T00:00:00Z"),
            (59.0, "1900-02-28T00:00:00Z"),
            (60.0, "1900-03-01T00:00:00Z"),
            (365.0, "1900-12-31T00:00:00Z"),
            (366.0, "1901-01-01T00:00:00Z"),
            (730.0, "1901-12-31T00:00:00Z"),
            (-1.0, "1899-12-31T00:00:00Z"),
            (1_000_000.0, "4637-11-07T00:00:00Z"),
        ] {
            assert_eq!(cf("days since 1900-01-01", Some("julian"), value), expected, "{value}");
        }
        assert_eq!(cf("hours since 1900-02-28 12:00", Some("julian"), 36.5), "1900-03-01T00:30:00Z");
        for n in (-800_000..800_000).step_by(997) {
            let (y, m, d) = julian_date(n);
            assert_eq!(julian_day_number(y, m, d), n, "{n}: {y}-{m}-{d}");
            assert!(d >= 1 && d <= julian_month_days(y, m), "{n}: {y}-{m}-{d}");
        }
    }

    #[test]
    fn cf_bad_units() {
        for units in [
            "months since 2000-01-01",
            "Months since 2000-01-01",
            "month since 2000-01-01",
            "years since 2000-01-01",
            "garbage",
            "",
            "hours",
            "hours since",
            "hours since   ",
            "hours after 2000-01-01",
            "fortnights since 2000-01-01",
            "hours since 2000-13-01",
            "hours since 2000-00-01",
            "hours since 2001-02-29",
            "hours since 2000-01-32",
            "hours since 2000-01-01 25:00",
            "hours since 2000-01-01 00:60",
            "hours since 2000-01-01 00:00:60",
            "hours since 2000-01-01T",
            "hours since 2000-01-01 00:00:00 junk",
            "hours since 01/01/2000",
            "hours since 2000-001-01",
            "hours since 2000-01-01 00:00:00 +25:00",
            "hours since 2000-01-01 00:00:00 +",
            "hours since 2000-01-01 000:00",
            "hours since 2000/01/01",
        ] {
            match CfTime::parse(units, None) {
                Err(TimeError::InvalidUnits { units: found, reason }) => {
                    assert_eq!(found, units);
                    assert!(!reason.is_empty());
                }
                other => panic!("{units:?}: {other:?}"),
            }
        }
        let message = CfTime::parse("months since 2000-01-01", None).unwrap_err().to_string();
        assert!(message.contains("months since 2000-01-01"), "{message}");
        assert!(CfTime::parse("days since 2000-02-29", Some("noleap")).is_err());
        assert!(CfTime::parse("days since 2000-02-30", Some("all_leap")).is_err());
        assert!(CfTime::parse("days since 2000-02-31", Some("360_day")).is_err());
        assert!(CfTime::parse("days since 1900-02-30", Some("julian")).is_err());
        assert!(CfTime::parse("months since 2000-01-01", Some("noleap")).is_err());
    }

    /// Months of the `360_day` calendar are 30 days and common years of `noleap` 365, as cftime reads them:
    /// `num2date([0, 1, 13.5], "months since 2000-01-01", "360_day")` gives 2000-01-01, 2000-02-01 and
    /// 2001-02-16; `num2date([2.5], "common_years since 1999-01-30", "noleap")` 2001-07-31 12:00.
    #[test]
    fn months_of_360_day_and_common_years_of_noleap() {
        let at = |units: &str, calendar: &str, value: f64| {
            format_instant(CfTime::parse(units, Some(calendar)).unwrap().to_instant(value).unwrap())
        };
        assert_eq!(at("months since 2000-01-01", "360_day", 0.0), "2000-01-01T00:00:00Z");
        assert_eq!(at("months since 2000-01-01", "360_day", 1.0), "2000-02-01T00:00:00Z");
        assert_eq!(at("months since 2000-01-01", "360_day", 13.5), "2001-02-16T00:00:00Z");
        // Feb 30 of the calendar goes on Feb 28 (1999 is no leap year).
        assert_eq!(at("month since 1999-01-30", "360_day", 1.0), "1999-02-28T00:00:00Z");
        assert_eq!(at("common_years since 1999-01-30", "noleap", 2.5), "2001-07-31T12:00:00Z");
        assert!(CfTime::parse("years since 2000-01-01", Some("360_day")).is_err());
        assert!(CfTime::parse("common_years since 2000-01-01", Some("standard")).is_err());
    }

    #[test]
    fn cf_bad_values() {
        let parsed = CfTime::parse("days since 2000-01-01", None).unwrap();
        for value in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300, -1e300, 1e12] {
            assert!(matches!(parsed.to_instant(value), Err(TimeError::InvalidValue { .. })), "{value}");
        }
        let day360 = CfTime::parse("days since 2000-01-01", Some("360_day")).unwrap();
        assert!(day360.to_instant(1e12).is_err());
        // Hand-built references must not panic either.
        let odd = CfTime {
            unit_seconds: 1,
            reference: (2000, 1, 1, u32::MAX, u32::MAX, f64::NAN),
            calendar: Calendar::Standard,
        };
        assert!(odd.to_instant(0.0).is_err());
        let odd = CfTime {
            unit_seconds: i64::MAX,
            reference: (2000, 13, 1, 0, 0, 0.0),
            calendar: Calendar::NoLeap,
        };
        assert!(odd.to_instant(1.0).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(ts("2019-03-01"), 1_551_398_400);
        assert_eq!(ts("2019-03-01T00:00:00Z"), 1_551_398_400);
        assert_eq!(ts("2019-03-01 06:30"), 1_551_398_400 + 6 * 3600 + 30 * 60);
        assert_eq!(ts("2019-03-01T00:00:00+02:00"), 1_551_398_400 - 7200);
        assert_eq!(ts("2019-03-01T00:00:00-0130"), 1_551_398_400 + 5400);
        assert_eq!(ts("2019-03-01t06:00:00z"), 1_551_398_400 + 6 * 3600);
        assert_eq!(ts("2019-03-01T00:00:00.000Z"), 1_551_398_400);
        // A fraction of a second, which the axis cannot hold, is refused (it was rounded: a start moved).
        assert!(matches!(parse_timestamp("2019-03-01T00:00:00.6Z"), Err(TimeError::FractionOfSecond(_))));
        assert_eq!(ts("  2019-3-1  "), 1_551_398_400);
        assert_eq!(ts("1970-01-01"), 0);
        assert_eq!(ts("1969-12-31T23:59:59Z"), -1);
        assert_eq!(ts("2020-02-29"), ts("2020-02-28") + 86_400);
        for text in [
            "",
            "2019",
            "2019-03",
            "2019-02-29",
            "2019-03-01T",
            "2019-03-01T24:00",
            "yesterday",
            "2019-03-01 06:30 CET",
            "2019-03-01T00:00:00+25:00",
            "2019-03-01T00:00:00ZZ",
            "03/01/2019",
        ] {
            assert!(matches!(parse_timestamp(text), Err(TimeError::InvalidDate(t)) if t == text), "{text:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_instant(1_551_398_400), "2019-03-01T00:00:00Z");
        assert_eq!(format_instant(-1), "1969-12-31T23:59:59Z");
        for text in ["0001-01-01T00:00:00Z", "1582-10-15T12:34:56Z", "9999-12-31T23:59:59Z"] {
            assert_eq!(format_instant(ts(text)), text);
        }
        for t in [-62_135_596_800, -1, 0, 1, 1_551_398_400, 253_402_300_800, 300_000_000_000] {
            assert_eq!(ts(&format_instant(t)), t, "{}", format_instant(t));
        }
        // Far outside chrono's range: still text, no panic.
        assert!(format_instant(Instant::MAX).contains("seconds since"));
    }

    #[test]
    fn steps_parse() {
        let hour = Step::Seconds(3600);
        for (text, expected) in [
            ("1h", hour),
            ("6H", Step::Seconds(6 * 3600)),
            ("30min", Step::Seconds(1800)),
            ("1d", Step::Seconds(86_400)),
            ("1D", Step::Seconds(86_400)),
            ("10s", Step::Seconds(10)),
            ("1w", Step::Seconds(604_800)),
            ("1mo", Step::Months(1)),
            ("3months", Step::Months(3)),
            ("1y", Step::Months(12)),
            ("h", hour),
            (" 2 days ", Step::Seconds(172_800)),
            ("PT1H", hour),
            ("pt1h", hour),
            ("P1D", Step::Seconds(86_400)),
            ("PT30M", Step::Seconds(1800)),
            ("P1M", Step::Months(1)),
            ("P1W", Step::Seconds(604_800)),
            ("P1Y", Step::Months(12)),
            ("P1Y6M", Step::Months(18)),
            ("P1DT12H", Step::Seconds(129_600)),
            ("PT1H30M10S", Step::Seconds(5410)),
        ] {
            assert_eq!(Step::parse(text).unwrap(), expected, "{text:?}");
        }
    }

    #[test]
    fn steps_rejected() {
        for text in ["1M", "5m", "M", " 1 M "] {
            match Step::parse(text) {
                Err(error @ TimeError::AmbiguousStep(_)) => {
                    let message = error.to_string();
                    assert!(message.contains("\"min\"") && message.contains("\"mo\""), "{message}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        for text in [
            "0h",
            "0mo",
            "-1h",
            "",
            "1.5h",
            "1 fortnight",
            "99999999999999999999h",
            "9999999999999999d",
            "P",
            "PT",
            "P0D",
            "P1M1D",
            "P1MT1H",
            "PT1D",
            "P1H",
            "P1D1Y",
            "PT1H1H",
            "P1DTT1H",
            "P1.5D",
            "Px",
        ] {
            assert!(matches!(Step::parse(text), Err(TimeError::InvalidStep(t)) if t == text), "{text:?}");
        }
    }

    #[test]
    fn steps_display_round_trips() {
        for (step, text) in [
            (Step::Seconds(3600), "1h"),
            (Step::Seconds(1800), "30min"),
            (Step::Seconds(86_400), "1d"),
            (Step::Seconds(604_800), "7d"),
            (Step::Seconds(90), "90s"),
            (Step::Seconds(21_600), "6h"),
            (Step::Seconds(5410), "5410s"),
            (Step::Months(1), "1mo"),
            (Step::Months(12), "12mo"),
        ] {
            assert_eq!(step.to_string(), text);
            assert_eq!(Step::parse(text).unwrap(), step);
        }
    }

    #[test]
    fn steps_advance() {
        let month = Step::Months(1);
        assert_eq!(month.advance(ts("2019-01-31"), 1), ts("2019-02-28"));
        assert_eq!(month.advance(ts("2020-01-31"), 1), ts("2020-02-29"));
        assert_eq!(month.advance(ts("2019-01-31"), 2), ts("2019-03-31"));
        assert_eq!(month.advance(ts("2019-03-31"), -1), ts("2019-02-28"));
        assert_eq!(month.advance(ts("2019-01-31T06:00:00Z"), 1), ts("2019-02-28T06:00:00Z"));
        assert_eq!(month.advance(ts("2019-11-15"), 3), ts("2020-02-15"));
        assert_eq!(Step::Months(12).advance(ts("2020-02-29"), 1), ts("2021-02-28"));
        assert_eq!(Step::Seconds(3600).advance(100, 3), 100 + 3 * 3600);
        assert_eq!(Step::Seconds(3600).advance(100, -1), 100 - 3600);
        assert_eq!(month.advance(42, 0), 42);
        assert_eq!(Step::Seconds(Instant::MAX).advance(0, 2), Instant::MAX);
        assert_eq!(month.advance(Instant::MAX, 1), Instant::MAX);
        assert_eq!(month.advance(0, i64::MIN), Instant::MIN);
    }

    #[test]
    fn regular_axes() {
        let start = ts("2019-03-01");
        let hour = Step::Seconds(3600);
        let inclusive = TimeAxis::regular(start, ts("2019-03-02"), hour).unwrap();
        assert_eq!(inclusive.len(), 25);
        assert_eq!(inclusive.times.last(), Some(&ts("2019-03-02")));
        assert_eq!(inclusive.step, Some(hour));
        let exclusive = TimeAxis::regular(start, ts("2019-03-01T23:30:00Z"), hour).unwrap();
        assert_eq!(exclusive.len(), 24);
        assert_eq!(exclusive.times.last(), Some(&ts("2019-03-01T23:00:00Z")));
        assert!(exclusive.times.windows(2).all(|w| w[1] - w[0] == 3600));
        let single = TimeAxis::regular(start, start, hour).unwrap();
        assert_eq!(single.times, vec![start]);
        assert!(!single.is_empty());

        assert!(matches!(TimeAxis::regular(start, start - 1, hour), Err(TimeError::InvalidRange(_))));
        assert!(matches!(TimeAxis::regular(start, start, Step::Seconds(0)), Err(TimeError::InvalidStep(_))));
        assert!(matches!(TimeAxis::regular(start, start, Step::Seconds(-5)), Err(TimeError::InvalidStep(_))));
        assert!(matches!(TimeAxis::regular(start, start, Step::Months(0)), Err(TimeError::InvalidStep(_))));
        assert!(matches!(
            TimeAxis::regular(0, 10_000_000, Step::Seconds(1)),
            Err(TimeError::InvalidRange(_))
        ));
        assert!(matches!(
            TimeAxis::regular(Instant::MIN, Instant::MAX, Step::Seconds(1)),
            Err(TimeError::InvalidRange(_))
        ));
        assert!(matches!(
            TimeAxis::regular(Instant::MIN, Instant::MAX, Step::Months(1)),
            Err(TimeError::InvalidRange(_))
        ));
    }

    #[test]
    fn monthly_axes() {
        let axis = TimeAxis::regular(ts("2019-01-31"), ts("2019-05-31"), Step::Months(1)).unwrap();
        let expected: Vec<Instant> = ["2019-01-31", "2019-02-28", "2019-03-31", "2019-04-30", "2019-05-31"]
            .into_iter()
            .map(ts)
            .collect();
        assert_eq!(axis.times, expected);
        assert_eq!(axis.step, Some(Step::Months(1)));
        let leap = TimeAxis::regular(ts("2020-01-31"), ts("2020-03-30"), Step::Months(1)).unwrap();
        assert_eq!(leap.times, vec![ts("2020-01-31"), ts("2020-02-29")]);
        let quarterly = TimeAxis::regular(ts("2019-01-01"), ts("2019-12-31"), Step::Months(3)).unwrap();
        assert_eq!(quarterly.len(), 4);
        assert_eq!(quarterly.times[3], ts("2019-10-01"));
        assert_eq!(quarterly.interval(3), (ts("2019-10-01"), ts("2020-01-01")));
    }

    #[test]
    fn axes_from_instants() {
        let axis = TimeAxis::from_instants(&[5, 1, 3, 3, 1]);
        assert_eq!(axis.times, vec![1, 3, 5]);
        assert_eq!(axis.step, Some(Step::Seconds(2)));
        let irregular = TimeAxis::from_instants(&[4, 1, 2]);
        assert_eq!(irregular.times, vec![1, 2, 4]);
        assert_eq!(irregular.step, None);
        assert_eq!(TimeAxis::from_instants(&[7, 7]).step, None);
        assert_eq!(TimeAxis::from_instants(&[7, 7]).len(), 1);
        let empty = TimeAxis::from_instants(&[]);
        assert!(empty.is_empty());
        assert_eq!(empty.step, None);
        let monthly: Vec<Instant> =
            ["2019-03-01", "2019-01-01", "2019-02-01", "2019-04-01"].into_iter().map(ts).collect();
        assert_eq!(TimeAxis::from_instants(&monthly).step, Some(Step::Months(1)));
        let month_ends: Vec<Instant> =
            ["2019-01-31", "2019-02-28", "2019-03-31"].into_iter().map(ts).collect();
        assert_eq!(TimeAxis::from_instants(&month_ends).step, Some(Step::Months(1)));
        let drifting: Vec<Instant> = ["2019-01-31", "2019-02-28", "2019-03-30"].into_iter().map(ts).collect();
        assert_eq!(TimeAxis::from_instants(&drifting).step, None);
        assert_eq!(TimeAxis::from_instants(&[Instant::MIN, 0, Instant::MAX]).step, None);
    }

    #[test]
    fn intervals_and_padding() {
        let start = ts("2019-03-01");
        let hourly = TimeAxis::regular(start, start + 2 * 3600, Step::Seconds(3600)).unwrap();
        assert_eq!(hourly.interval(0), (start, start + 3600));
        assert_eq!(hourly.interval(2), (start + 7200, start + 3 * 3600));
        assert_eq!(hourly.padded(2), (0..5).map(|i| start + i * 3600).collect::<Vec<_>>());
        assert_eq!(hourly.padded(0), hourly.times);

        let irregular = TimeAxis::from_instants(&[0, 10, 30]);
        assert_eq!(irregular.interval(1), (10, 30));
        assert_eq!(irregular.interval(2), (30, 50));
        assert_eq!(irregular.padded(2), vec![0, 10, 30, 50, 70]);

        let single = TimeAxis::from_instants(&[100]);
        assert_eq!(single.interval(0), (100, 101));
        assert_eq!(single.padded(2), vec![100, 101, 102]);

        let monthly = TimeAxis::regular(ts("2019-01-31"), ts("2019-02-28"), Step::Months(1)).unwrap();
        assert_eq!(monthly.interval(1), (ts("2019-02-28"), ts("2019-03-31")));
        assert_eq!(monthly.padded(2)[2..], [ts("2019-03-31"), ts("2019-04-30")]);
        // A monthly axis whose first instant is not its origin continues from the last instant.
        let shifted =
            TimeAxis { times: vec![ts("2019-02-28"), ts("2019-03-28")], step: Some(Step::Months(1)) };
        assert_eq!(shifted.padded(1)[2], ts("2019-04-28"));

        assert!(TimeAxis::from_instants(&[]).padded(3).is_empty());
    }

    #[test]
    fn cf_units_choice() {
        let day = |s: &str| format!("{s} since 1970-01-01 00:00:00");
        assert_eq!(TimeAxis::cf_units(&[0, 86_400, -86_400]), (86_400, day("days")));
        assert_eq!(TimeAxis::cf_units(&[0, 86_400, 5 * 3600]), (3600, day("hours")));
        assert_eq!(TimeAxis::cf_units(&[-3600]), (3600, day("hours")));
        assert_eq!(TimeAxis::cf_units(&[60, 86_400]), (60, day("minutes")));
        assert_eq!(TimeAxis::cf_units(&[1, 86_400]), (1, day("seconds")));
        assert_eq!(TimeAxis::cf_units(&[]), (86_400, day("days")));
        // The result must itself parse back as CF units.
        let (unit, units) = TimeAxis::cf_units(&[7200]);
        let parsed = CfTime::parse(&units, None).unwrap();
        assert_eq!(parsed.unit_seconds, unit);
        assert_eq!(parsed.to_instant(2.0).unwrap(), 7200);
    }

    #[test]
    fn map_hourly_source_to_daily_target() {
        let start = ts("2019-03-01");
        // Reversed, so that indices and time order differ.
        let source: Vec<Instant> = (0..48).rev().map(|h| start + h * 3600).collect();
        let target = TimeAxis::regular(start, start + 86_400, Step::Seconds(86_400)).unwrap();
        let mapping = map_steps(&target, &source);
        assert_eq!(
            mapping,
            vec![
                StepSources::Aggregate((24..48).rev().collect()),
                StepSources::Aggregate((0..24).rev().collect()),
            ]
        );
    }

    #[test]
    fn map_monthly_source_to_daily_target() {
        let source: Vec<Instant> = (0..12).map(|m| Step::Months(1).advance(ts("2019-01-01"), m)).collect();
        let target = TimeAxis::regular(ts("2019-01-01"), ts("2020-01-31"), Step::Seconds(86_400)).unwrap();
        let mapping = map_steps(&target, &source);
        assert_eq!(mapping.len(), target.len());
        let on = |day: &str| {
            let i = target.times.iter().position(|&t| t == ts(day)).unwrap();
            mapping[i].clone()
        };
        assert_eq!(on("2019-01-01"), StepSources::Aggregate(vec![0]));
        assert_eq!(on("2019-01-02"), StepSources::Nearest(vec![0]));
        // Midpoint equally far (15.5 days) from Jan 1 and Feb 1: the earlier wins, and the median spacing
        // of 31 days allows exactly 15.5 days.
        assert_eq!(on("2019-01-16"), StepSources::Nearest(vec![0]));
        assert_eq!(on("2019-01-17"), StepSources::Nearest(vec![1]));
        assert_eq!(on("2019-02-01"), StepSources::Aggregate(vec![1]));
        assert_eq!(on("2019-12-16"), StepSources::Nearest(vec![11]));
        assert_eq!(on("2019-12-17"), StepSources::Empty);
        assert_eq!(on("2020-01-15"), StepSources::Empty);
        let aggregated = mapping.iter().filter(|s| matches!(s, StepSources::Aggregate(_))).count();
        assert_eq!(aggregated, 12);
    }

    #[test]
    fn map_duplicate_instants() {
        let day = 86_400;
        let t0 = ts("2019-03-01");
        // Two files at day 0 12:00 (indices 0 and 2), one at day 2 12:00.
        let source = [t0 + day / 2, t0 + 2 * day + day / 2, t0 + day / 2];
        let target = TimeAxis::regular(t0, t0 + 4 * day, Step::Seconds(day)).unwrap();
        assert_eq!(
            map_steps(&target, &source),
            vec![
                StepSources::Aggregate(vec![0, 2]),
                // One day from both neighbours: the earlier wins; tolerance max(2 d, 1 d) / 2 = 1 d.
                StepSources::Nearest(vec![0, 2]),
                StepSources::Aggregate(vec![1]),
                StepSources::Nearest(vec![1]),
                StepSources::Empty,
            ]
        );
    }

    #[test]
    fn map_single_instant_source() {
        let t0 = ts("2019-03-01");
        let target = TimeAxis::regular(t0, ts("2019-03-03"), Step::Seconds(86_400)).unwrap();
        // Spacing 0, so the tolerance is half the target interval: 12 h from the midpoint.
        assert_eq!(
            map_steps(&target, &[ts("2019-03-02")]),
            vec![StepSources::Nearest(vec![0]), StepSources::Aggregate(vec![0]), StepSources::Empty]
        );
        assert_eq!(map_steps(&target, &[]), vec![StepSources::Empty; 3]);
        assert!(map_steps(&TimeAxis::from_instants(&[]), &[1, 2]).is_empty());
    }

    #[test]
    fn map_irregular_target_uses_its_intervals() {
        let target = TimeAxis::from_instants(&[0, 10, 30]);
        // [10, 30) has no source step: 31 is 11 from the midpoint 20 (8 is 12), within max(median spacing
        // 26, 20) / 2 = 13. The last interval is [30, 50), so 31 aggregates there too and 60 is beyond the axis.
        assert_eq!(
            map_steps(&target, &[8, 31, 60]),
            vec![
                StepSources::Aggregate(vec![0]),
                StepSources::Nearest(vec![1]),
                StepSources::Aggregate(vec![1])
            ]
        );
        // With 5, 45, 60 the nearest (5) is 15 from the midpoint, beyond max(27.5, 20) / 2.
        assert_eq!(
            map_steps(&target, &[5, 45, 60]),
            vec![StepSources::Aggregate(vec![0]), StepSources::Empty, StepSources::Aggregate(vec![1])]
        );
    }

    #[test]
    fn map_is_fast_for_large_axes() {
        let n = 100_000;
        let source: Vec<Instant> = (0..n).map(|i| i * 3600).collect();
        let target = TimeAxis::regular(1800, (n - 1) * 3600 + 1800, Step::Seconds(3600)).unwrap();
        let begin = std::time::Instant::now();
        let mapping = map_steps(&target, &source);
        assert_eq!(mapping.len(), n as usize);
        assert_eq!(mapping[0], StepSources::Aggregate(vec![1]));
        assert_eq!(mapping[n as usize - 2], StepSources::Aggregate(vec![n as usize - 1]));
        // The last interval ends half an hour after the last source step; its midpoint is an hour away.
        assert_eq!(mapping[n as usize - 1], StepSources::Empty);
        assert!(begin.elapsed().as_secs() < 10);
    }

    fn target_axis() -> impl Strategy<Value = TimeAxis> {
        prop_oneof![
            (-500i64..5000, 1i64..600, 1usize..40, 0i64..600).prop_map(|(start, step, count, extra)| {
                let end = start + step * (count as i64 - 1) + extra % step;
                TimeAxis::regular(start, end, Step::Seconds(step)).unwrap()
            }),
            prop::collection::vec(-500i64..6000, 1..40).prop_map(|times| TimeAxis::from_instants(&times)),
        ]
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC{0,40}", digits in "[0-9 :TZ+.-]{0,30}", value in any::<f64>()) {
            for calendar in [None, Some("360_day"), Some("noleap"), Some("all_leap")] {
                if let Ok(parsed) = CfTime::parse(&format!("days since {digits}"), calendar) {
                    let _ = parsed.to_instant(value);
                }
                let _ = CfTime::parse(&text, calendar);
            }
            let _ = parse_timestamp(&text);
            let _ = parse_timestamp(&digits);
            let _ = Step::parse(&text);
            let _ = Step::parse(&format!("P{digits}"));
        }

        #[test]
        fn aggregates_partition_the_covered_source(
            source in prop::collection::vec(-1000i64..8000, 0..80),
            target in target_axis(),
        ) {
            let mapping = map_steps(&target, &source);
            prop_assert_eq!(mapping.len(), target.len());
            let mut seen = vec![0usize; source.len()];
            for (i, sources) in mapping.iter().enumerate() {
                let (start, end) = target.interval(i);
                match sources {
                    StepSources::Aggregate(indices) => {
                        prop_assert!(!indices.is_empty());
                        for &k in indices {
                            prop_assert!(start <= source[k] && source[k] < end);
                            seen[k] += 1;
                        }
                    }
                    StepSources::Nearest(indices) => {
                        prop_assert!(!indices.is_empty());
                        let instant = source[indices[0]];
                        prop_assert!(instant < start || instant >= end);
                        let sharing = source.iter().filter(|&&t| t == instant).count();
                        prop_assert_eq!(indices.len(), sharing);
                        prop_assert!(indices.iter().all(|&k| source[k] == instant));
                    }
                    StepSources::Empty => {}
                }
            }
            let span_start = target.times[0];
            let span_end = target.interval(target.len() - 1).1;
            for (k, &t) in source.iter().enumerate() {
                let inside = span_start <= t && t < span_end;
                prop_assert_eq!(seen[k], usize::from(inside), "source {} at {}", k, t);
            }
        }
    }
}
