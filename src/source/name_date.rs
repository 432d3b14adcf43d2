//! Dates in file names: how image-by-image archives (Sentinel-2, MODIS, model output written one step per
//! file) say when each file was taken, where the file itself does not.
//!
//! Read, the first one in the name winning:
//! - a date: `20240305`, `2024-03-05`, `2024_03_05`, `2024.03.05`; the hour (and minutes, seconds) may follow
//!   in the same digits: `2019030106`, `201903010600`, `20190301060000`; or a month, `2019-03`, `2019_03`,
//!   `2019.03`, at its first day;
//! - the year and day of the year of MODIS (`A2024065`, a swath's `A2024065.1030`), HLS (`2024065T103021`)
//!   and GOES-R (`_s20240311234567_e…`, the scan's start, its tenths of a second dropped);
//! - then, optionally, a time of day after `T`, `_`, `-` or a space: `T10:30:00`, `T10:30`, `T103021`,
//!   `_0600`, `-06-00-00`, IMERG's `-S033000`, and an hour alone after `T` or before `z`/`h` (`T06`,
//!   `_06z`). Without one, the date is at midnight UTC.
//!
//! Years are 1800 to 2199. A digit run of any other length (a tile or orbit number) is no date, and a
//! number after the date that is not a valid time of day (`_01`, `_2501`) leaves it at midnight.

use chrono::NaiveDate;

use crate::time::Instant;

/// What the names of a series' files are read as, for messages about names that were not.
pub const NAME_DATE_FORMS: &str = "20240305, 2024-03-05, 2024_03_05, 2024.03.05, 2019030106, 201903010600, \
                                   a month as 2019-03, MODIS's A2024065, HLS's 2024065T103021 or GOES-R's \
                                   _s20240311234567_e…, with a time as T103021, T10:30:00, T06, _0600, -06-00-00 \
                                   or IMERG's -S033000";

/// The instant a file's name gives (see the module's documentation), `None` when it gives none.
#[must_use]
pub fn time_from_file_name(name: &str) -> Option<Instant> {
    let bytes = name.as_bytes();
    (0..bytes.len()).find_map(|start| date_at(bytes, start))
}

/// What may separate a date's year, month and day.
const SEPARATORS: [u8; 3] = [b'-', b'_', b'.'];

/// Digits from `at` on, as many as follow one another.
fn digit_run(bytes: &[u8], at: usize) -> usize {
    bytes.get(at..).map_or(0, |rest| rest.iter().take_while(|b| b.is_ascii_digit()).count())
}

/// The value of the decimal digits `bytes[from..to]` (all digits, checked by the caller).
fn number(bytes: &[u8], from: usize, to: usize) -> u32 {
    bytes[from..to].iter().fold(0, |n, &d| n * 10 + u32::from(d - b'0'))
}

/// Years a file name's date may have: others are taken for tile, orbit or scene numbers.
const YEARS: std::ops::Range<u32> = 1800..2200;

/// A date starting at `start` (and its time of day), if one does.
fn date_at(bytes: &[u8], start: usize) -> Option<Instant> {
    if start > 0 && bytes[start - 1].is_ascii_digit() {
        return None;
    }
    let after_mark = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
    // MODIS: `A` and the year and day of the year, after a separator (`MOD13Q1.A2024065.h18v04`), and a
    // swath's time (`MOD021KM.A2024065.1030`).
    if bytes[start] == b'A' {
        if !after_mark || digit_run(bytes, start + 1) != 7 {
            return None;
        }
        let date = day_of_year(bytes, start + 1)?;
        let swath = (bytes.get(start + 8) == Some(&b'.') && digit_run(bytes, start + 9) == 4)
            .then(|| {
                seconds_of_day(number(bytes, start + 9, start + 11), number(bytes, start + 11, start + 13), 0)
            })
            .flatten();
        return instant(date, swath.or_else(|| clock_after(bytes, start + 8)).unwrap_or(0));
    }
    let run = digit_run(bytes, start);
    if !YEARS.contains(&number(bytes, start, start + run.min(4))) || run < 4 {
        return None;
    }
    // GOES-R ABI: `_s` and the year, day of the year, time and tenths of a second of the scan's start,
    // followed by its end, `_e…` (`OR_ABI-L2-CMIPF-M6C13_G16_s20240311234567_e20240311243567_c…`).
    let goes = run == 14
        && start >= 2
        && bytes[start - 2..start] == *b"_s"
        && bytes.get(start + 14..start + 16) == Some(b"_e".as_slice())
        && digit_run(bytes, start + 16) == 14;
    // HLS: the year and day of the year, then `T` and the time (`HLS.S30.T10SFG.2024065T103021.v2.0`).
    let hls = run == 7 && bytes.get(start + 7) == Some(&b'T');
    if goes || hls {
        let seconds = if goes {
            seconds_of_day(
                number(bytes, start + 7, start + 9),
                number(bytes, start + 9, start + 11),
                number(bytes, start + 11, start + 13),
            )
        } else {
            clock_after(bytes, start + 7)
        };
        // Otherwise the digits are read as a calendar date below, if they are one.
        if let Some(t) = day_of_year(bytes, start).zip(seconds).and_then(|(date, s)| instant(date, s)) {
            return Some(t);
        }
    }
    let separated = |sep: u8| {
        run == 4
            && bytes.get(start + 4) == Some(&sep)
            && digit_run(bytes, start + 5) == 2
            && bytes.get(start + 7) == Some(&sep)
            && digit_run(bytes, start + 8) == 2
    };
    // A month without its day (`2019-03`, CHIRPS's monthly `2019.03`), its first day; not one followed
    // by a letter (`landcover_2020_10m`) or by a day of its own.
    let month_only = |sep: u8| {
        run == 4
            && bytes.get(start + 4) == Some(&sep)
            && digit_run(bytes, start + 5) == 2
            && !bytes.get(start + 7).is_some_and(u8::is_ascii_alphanumeric)
            && !(bytes.get(start + 7) == Some(&sep) && digit_run(bytes, start + 8) > 0)
    };
    let (month_at, day_at, end) = if SEPARATORS.iter().any(|&sep| separated(sep)) {
        (start + 5, Some(start + 8), start + 10)
    } else if matches!(run, 8 | 10 | 12 | 14) {
        (start + 4, Some(start + 6), start + 8)
    } else if SEPARATORS.iter().any(|&sep| month_only(sep)) {
        (start + 5, None, start + 7)
    } else {
        return None;
    };
    let year = i32::try_from(number(bytes, start, start + 4)).ok()?;
    let day = day_at.map_or(1, |at| number(bytes, at, at + 2));
    let date = NaiveDate::from_ymd_opt(year, number(bytes, month_at, month_at + 2), day)?;
    let seconds = if day_at.is_none() {
        0
    } else if run > 8 {
        // The time of day in the date's own digits: hour, minutes, seconds.
        let field = |k: usize| {
            (start + 8 + 2 * k + 2 <= start + run)
                .then(|| number(bytes, start + 8 + 2 * k, start + 10 + 2 * k))
        };
        seconds_of_day(field(0)?, field(1).unwrap_or(0), field(2).unwrap_or(0))?
    } else {
        clock_after(bytes, end).unwrap_or(0)
    };
    instant(date, seconds)
}

/// The date of a year and day of the year written `YYYYDDD` at `at`.
fn day_of_year(bytes: &[u8], at: usize) -> Option<NaiveDate> {
    let year = number(bytes, at, at + 4);
    if !YEARS.contains(&year) {
        return None;
    }
    NaiveDate::from_yo_opt(i32::try_from(year).ok()?, number(bytes, at + 4, at + 7))
}

/// A time of day written after a date that ends at `at`: seconds after midnight.
fn clock_after(bytes: &[u8], at: usize) -> Option<u32> {
    let sep = *bytes.get(at)?;
    if !matches!(sep, b'T' | b'_' | b'-' | b' ') {
        return None;
    }
    // GPM IMERG writes the start of its half hour as `-S033000`.
    let from = if sep == b'-' && bytes.get(at + 1) == Some(&b'S') { at + 2 } else { at + 1 };
    let two = |i: usize| (digit_run(bytes, i) >= 2).then(|| number(bytes, i, i + 2));
    let run = digit_run(bytes, from);
    match run {
        6 => seconds_of_day(two(from)?, two(from + 2)?, two(from + 4)?),
        4 => seconds_of_day(two(from)?, two(from + 2)?, 0),
        2 => {
            let hour = two(from)?;
            // `HH:MM[:SS]` and `HH-MM-SS`: fields after the same mark.
            let field = |k: usize, mark: u8| {
                let at = from + 3 * k - 1;
                (bytes.get(at) == Some(&mark) && digit_run(bytes, at + 1) == 2)
                    .then(|| number(bytes, at + 1, at + 3))
            };
            if let Some(minute) = field(1, b':') {
                seconds_of_day(hour, minute, field(2, b':').unwrap_or(0))
            } else if let (Some(minute), Some(second)) = (field(1, b'-'), field(2, b'-')) {
                seconds_of_day(hour, minute, second)
            } else if sep == b'T' || matches!(bytes.get(from + 2), Some(b'z' | b'Z' | b'h')) {
                seconds_of_day(hour, 0, 0)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Seconds after midnight of a valid time of day.
fn seconds_of_day(hour: u32, minute: u32, second: u32) -> Option<u32> {
    (hour < 24 && minute < 60 && second < 60).then_some(hour * 3600 + minute * 60 + second)
}

/// The instant `seconds` after midnight UTC of `date`.
fn instant(date: NaiveDate, seconds: u32) -> Option<Instant> {
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp() + i64::from(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time;

    fn read(name: &str) -> Option<String> {
        time_from_file_name(name).map(time::format_instant)
    }

    #[test]
    fn dates_and_times_as_archives_write_them() {
        for (name, expected) in [
            ("ndvi_20240305", "2024-03-05T00:00:00Z"),
            ("20240305", "2024-03-05T00:00:00Z"),
            ("S2A_2024-03-05T10:30:00", "2024-03-05T10:30:00Z"),
            ("S2A_MSIL2A_20240305T103021_N0510_R108_T31UFQ", "2024-03-05T10:30:21Z"),
            ("t2m_20190301T0600", "2019-03-01T06:00:00Z"),
            ("t2m_20190301T06", "2019-03-01T06:00:00Z"),
            ("era5_20190301_0600", "2019-03-01T06:00:00Z"),
            ("era5_20190301_1830", "2019-03-01T18:30:00Z"),
            ("gfs_20190301_12z", "2019-03-01T12:00:00Z"),
            ("t2m_2019-03-01T06-00-00", "2019-03-01T06:00:00Z"),
            ("t2m_2019-03-01T18:45", "2019-03-01T18:45:00Z"),
            ("t2m_2019-03-01 06:00:00", "2019-03-01T06:00:00Z"),
            ("t2m_2019_03_01", "2019-03-01T00:00:00Z"),
            ("ST4.2013052210.01h", "2013-05-22T10:00:00Z"),
            ("radar_201305221045", "2013-05-22T10:45:00Z"),
            ("radar_20130522104530", "2013-05-22T10:45:30Z"),
            ("MOD13Q1.A2024065.h18v04.061.2024082123456", "2024-03-05T00:00:00Z"),
            ("MOD13Q1.A2024366.h18v04", "2024-12-31T00:00:00Z"),
            ("ndvi_20240305_01", "2024-03-05T00:00:00Z"),
            ("ndvi_20240305_2501", "2024-03-05T00:00:00Z"),
            ("v2_20240305", "2024-03-05T00:00:00Z"),
            ("chirps-v2.0.2019.03.01", "2019-03-01T00:00:00Z"),
            ("chirps-v2.0.2019.03", "2019-03-01T00:00:00Z"),
            ("ndvi_2019-11", "2019-11-01T00:00:00Z"),
            ("ndvi_2019_11_v2", "2019-11-01T00:00:00Z"),
            (
                "OR_ABI-L2-CMIPF-M6C13_G16_s20240311234567_e20240311243567_c20240311244012",
                "2024-01-31T12:34:56Z",
            ),
            ("3B-HHR.MS.MRG.3IMERG.20200101-S033000-E035959.0210.V06B", "2020-01-01T03:30:00Z"),
            ("MOD021KM.A2024065.1030.061.2024066012345", "2024-03-05T10:30:00Z"),
            ("HLS.S30.T10SFG.2024065T103021.v2.0.B04", "2024-03-05T10:30:21Z"),
            ("x_s20190101000000", "2019-01-01T00:00:00Z"),
            ("x_s20190301060000_v2", "2019-03-01T06:00:00Z"),
            ("ndvi20240305", "2024-03-05T00:00:00Z"),
        ] {
            assert_eq!(read(name).as_deref(), Some(expected), "{name}");
        }
    }

    #[test]
    fn other_numbers_are_no_dates() {
        for name in [
            "dem",
            "tile_123456789",
            "tile_1234567",
            "orbit_20241305",
            "x2024-13-05",
            "MOD13Q1.A2023366.h18v04",
            "BA2024065",
            "scene_20240230",
            "tile_1234_05",
            "tile_1234_05_06",
            "landcover_2020_10m",
            "LC80440342020075LGN00",
            "scene_31001231",
            "x_s2019030106000",
            "ndvi_2019-13",
            "ndvi_2019-11-5",
        ] {
            assert_eq!(read(name), None, "{name}");
        }
    }
}
