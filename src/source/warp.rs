//! Reading a window of the target grid from one source file with GDAL's warper (`GDALWarp`, the engine of
//! `gdalwarp`), never with hand-written projections.
//!
//! The bands to read are first gathered in an in-memory VRT: it selects the time steps, attaches a CRS or
//! geotransform that the file lacks, and mosaics a 0…360° grid with its −360° copy. The warp then writes into
//! an in-memory Float64 raster that covers the window rows of the target grid, with NaN where nothing is known.
//! Values come back raw (packed), and the caller unpacks them, where the resampling commutes with unpacking
//! (weighted means, and selections under a positive scale: [`Resampling::commutes_with_unpacking`]). For the
//! others (a sum or root mean square of values with an offset, min or max under a negative scale) a second
//! VRT over the first unpacks before the warp, in Float64.

use std::ffi::{CString, c_char};
use std::fmt::Write;
use std::ops::Range;
use std::ptr;

use gdal::raster::GdalDataType;
use gdal::{Dataset, DriverManager};

use super::{FileView, Georef, SourceError};
use crate::config::Resampling;
use crate::grid::Grid;

/// WKT of the target CRS (EPSG:4326), computed once.
fn target_wkt() -> &'static str {
    static WKT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    WKT.get_or_init(|| {
        gdal::spatial_ref::SpatialRef::from_epsg(4326).and_then(|s| s.to_wkt()).expect("PROJ knows EPSG:4326")
    })
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn gdal_type_name(data_type: GdalDataType) -> &'static str {
    match data_type {
        GdalDataType::UInt8 => "Byte",
        GdalDataType::UInt16 => "UInt16",
        GdalDataType::Int16 => "Int16",
        GdalDataType::UInt32 => "UInt32",
        GdalDataType::Int32 => "Int32",
        GdalDataType::Float32 => "Float32",
        _ => "Float64",
    }
}

/// The VRT XML exposing `bands` (each a file and its 1-based band, in order) with a georeferencing the warper
/// can use. All files share one grid (the first's): [`FileView::same_grid`].
#[must_use]
///
/// `missing_value` is a second stored value meaning "missing" (a `NetCDF` `missing_value` beside a different
/// `_FillValue`), which GDAL does not mask: each source then leaves those pixels out (a `ComplexSource`'s
/// `NODATA`), so that they read as the band's `nodata`, which the warp masks.
pub fn vrt_xml(
    bands: &[(&FileView, usize)],
    data_type: GdalDataType,
    nodata: Option<f64>,
    missing_value: Option<f64>,
) -> String {
    let file = bands.first().expect("at least one band").0;
    debug_assert!(bands.iter().all(|(f, _)| f.same_grid(file)), "bands of one VRT share a grid");
    let (w, h) = file.size;
    let mut xml = String::new();
    let (width, copies, header) = georeferencing(file);
    let _ = write!(xml, "<VRTDataset rasterXSize=\"{width}\" rasterYSize=\"{h}\">{header}");
    let type_name = gdal_type_name(data_type);
    for (i, (file, band)) in bands.iter().enumerate() {
        let source_name = xml_escape(&file.gdal_name);
        let _ = write!(xml, "<VRTRasterBand dataType=\"{type_name}\" band=\"{}\">", i + 1);
        if let Some(nodata) = nodata {
            let _ = write!(xml, "<NoDataValue>{}</NoDataValue>", format_nodata(nodata));
        }
        // The source's own value of a signed one (−1 is the byte 255 there).
        let raw = |x: f64| if file.signed_bytes && x < 0.0 { x + 256.0 } else { x };
        let (mut kind, mut left_out) = match missing_value.filter(|_| nodata.is_some()) {
            Some(missing) => ("ComplexSource", format!("<NODATA>{}</NODATA>", format_nodata(raw(missing)))),
            None => ("SimpleSource", String::new()),
        };
        if file.signed_bytes {
            // Bytes 128…255 are −128…−1.
            kind = "ComplexSource";
            left_out.push_str("<LUT>0:0,127:127,128:-128,255:-1</LUT>");
        }
        for offset in &copies {
            let _ = write!(
                xml,
                "<{kind}><SourceFilename relativeToVRT=\"0\">{source_name}</SourceFilename>\
                 <SourceBand>{band}</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/>\
                 <DstRect xOff=\"{offset}\" yOff=\"0\" xSize=\"{w}\" ySize=\"{h}\"/>{left_out}</{kind}>"
            );
        }
        xml.push_str("</VRTRasterBand>");
    }
    xml.push_str("</VRTDataset>");
    xml
}

/// A Float64 VRT of `bands` unpacked (`stored × scale + offset`): each band reads its own [`vrt_xml`] (given
/// inline), leaving out its nodata pixels, which read as NaN.
fn unpacked_vrt_xml(
    bands: &[(&FileView, usize)],
    data_type: GdalDataType,
    (nodata, missing_value): (Option<f64>, Option<f64>),
    (scale, offset): (f64, f64),
) -> String {
    let file = bands.first().expect("at least one band").0;
    let (width, _, header) = georeferencing(file);
    let h = file.size.1;
    let mut xml = format!("<VRTDataset rasterXSize=\"{width}\" rasterYSize=\"{h}\">{header}");
    for (i, band) in bands.iter().enumerate() {
        let raw = xml_escape(&vrt_xml(std::slice::from_ref(band), data_type, nodata, missing_value));
        let _ = write!(xml, "<VRTRasterBand dataType=\"Float64\" band=\"{}\">", i + 1);
        let left_out = nodata.map_or(String::new(), |nodata| {
            xml.push_str("<NoDataValue>nan</NoDataValue>");
            format!("<NODATA>{}</NODATA>", format_nodata(nodata))
        });
        let _ = write!(
            xml,
            "<ComplexSource><SourceFilename relativeToVRT=\"0\">{raw}</SourceFilename><SourceBand>1</SourceBand>\
             <SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{width}\" ySize=\"{h}\"/>\
             <DstRect xOff=\"0\" yOff=\"0\" xSize=\"{width}\" ySize=\"{h}\"/>{left_out}\
             <ScaleOffset>{offset:.17e}</ScaleOffset><ScaleRatio>{scale:.17e}</ScaleRatio></ComplexSource>\
             </VRTRasterBand>"
        );
    }
    xml.push_str("</VRTDataset>");
    xml
}

/// A VRT's georeferencing of `file`: its width (a 0…360° grid gets a copy at −360° before it), the offsets of
/// its copies, and the XML of its CRS and geotransform or geolocation arrays.
fn georeferencing(file: &FileView) -> (usize, Vec<usize>, String) {
    let w = file.size.0;
    match &file.georef {
        Georef::Transform { geotransform: gt, wkt, wrap_cols } => {
            let (width, copies, x0) = match wrap_cols {
                // Copy at −360° first (offset 0), then the original (offset = 360° in cells).
                Some(cols) => (cols + w, vec![0, *cols], gt[0] - *cols as f64 * gt[1]),
                None => (w, vec![0], gt[0]),
            };
            let header = format!(
                "<SRS dataAxisToSRSAxisMapping=\"{}\">{}</SRS><GeoTransform>{x0:.17e},{:.17e},{:.17e},{:.17e},{:.17e},{:.17e}</GeoTransform>",
                axis_mapping(wkt),
                xml_escape(wkt),
                gt[1],
                gt[2],
                gt[3],
                gt[4],
                gt[5]
            );
            (width, copies, header)
        }
        Georef::Geolocation { metadata } => {
            let items = metadata.iter().fold(String::new(), |mut items, (k, v)| {
                let _ = write!(items, "<MDI key=\"{}\">{}</MDI>", xml_escape(k), xml_escape(v));
                items
            });
            (w, vec![0], format!("<Metadata domain=\"GEOLOCATION\">{items}</Metadata>"))
        }
    }
}

/// Geographic CRSs declare lat/lon axis order; raster data is always x (lon) first.
fn axis_mapping(wkt: &str) -> &'static str {
    let swapped = gdal::spatial_ref::SpatialRef::from_wkt(wkt).is_ok_and(|s| {
        s.is_geographic()
            && s.axis_orientation("GEOGCS", 0).is_ok_and(|o| o == gdal_sys::OGRAxisOrientation::OAO_North)
    });
    if swapped { "2,1" } else { "1,2" }
}

fn format_nodata(v: f64) -> String {
    if v.is_nan() { "nan".to_string() } else { format!("{v:.17e}") }
}

/// Warps `bands` (each a file and its 1-based band; the files share one grid) onto a window `(rows, columns)`
/// of `grid`. One warp serves every band: GDAL transforms the window's coordinates once for all of them, so
/// an archive of images on one tile pays for its projection once, not once per date.
/// Returns the `rows × columns` rasters of the bands one after the other, row-major, NaN where no source
/// pixel contributes: stored values, or with `unpack` = `(scale, offset)` unpacked values.
///
/// # Errors
/// [`SourceError::Gdal`] naming the first file when GDAL fails (warp the files one by one to know which).
pub fn warp_window(
    bands: &[(&FileView, usize)],
    data_type: GdalDataType,
    (nodata, missing_value): (Option<f64>, Option<f64>),
    unpack: Option<(f64, f64)>,
    resampling: Resampling,
    grid: &Grid,
    (window_rows, window_cols): (Range<usize>, Range<usize>),
) -> Result<Vec<f64>, SourceError> {
    let (row0, rows) = (window_rows.start, window_rows.len());
    let (col0, cols) = (window_cols.start, window_cols.len());
    let file = bands.first().expect("at least one band").0;
    let fail = |message: String| SourceError::Gdal { path: file.path.clone(), message };
    let (xml, data_type) = match unpack {
        Some(unpack) => {
            (unpacked_vrt_xml(bands, data_type, (nodata, missing_value), unpack), GdalDataType::Float64)
        }
        None => (vrt_xml(bands, data_type, nodata, missing_value), data_type),
    };
    let source = Dataset::open(&xml).map_err(|e| fail(format!("cannot open it through a VRT: {e}")))?;
    // The warp writes straight into `out`: a MEM dataset whose bands are views of it. NaN before the warp
    // too: GDAL skips a window that no source pixel reaches, without applying `INIT_DEST`.
    let mut out = vec![f64::NAN; bands.len() * rows * cols];
    let mut target = window_dataset(&mut out, cols, rows, bands.len()).map_err(&fail)?;
    let mut geotransform = grid.geotransform(row0);
    geotransform[0] += col0 as f64 * grid.res_x;
    target.set_geo_transform(&geotransform).map_err(|e| fail(e.to_string()))?;
    target.set_projection(target_wkt()).map_err(|e| fail(e.to_string()))?;
    let scale = (file.native_res.0 / grid.res_x, file.native_res.1 / grid.res_y);
    run_gdal_warp(&source, &target, resampling, scale, working_type(data_type))
        .map_err(|m| fail(format!("warp failed: {m}")))?;
    let outside =
        if resampling.is_area() { Some(centres_outside(&source, &target).map_err(fail)?) } else { None };
    drop(target);
    if let Some(outside) = &outside {
        for raster in out.chunks_exact_mut(rows * cols) {
            for (value, &out) in raster.iter_mut().zip(outside) {
                if out {
                    *value = f64::NAN;
                }
            }
        }
    }
    Ok(out)
}

/// A MEM dataset of `count` Float64 bands of `cols × rows` over `buffer` (band after band), which must
/// outlive it.
fn window_dataset(buffer: &mut [f64], cols: usize, rows: usize, count: usize) -> Result<Dataset, String> {
    assert_eq!(buffer.len(), count * cols * rows, "one raster per band");
    let driver = DriverManager::get_driver_by_name("MEM").map_err(|e| e.to_string())?;
    let target = driver
        .create_with_band_type::<f64, _>("", cols, rows, 0)
        .map_err(|e| format!("cannot allocate the warp window: {e}"))?;
    for raster in buffer.chunks_exact_mut((cols * rows).max(1)) {
        let option = CString::new(format!("DATAPOINTER={:p}", raster.as_mut_ptr())).expect("no NUL");
        let mut options = [option.as_ptr().cast_mut(), ptr::null_mut()];
        // SAFETY: the dataset is open; the options array is NULL-terminated and outlives the call; the band
        // views `cols × rows` doubles of `raster`, which the caller keeps alive longer than the dataset.
        let err = unsafe {
            gdal_sys::CPLErrorReset();
            gdal_sys::GDALAddBand(
                target.c_dataset(),
                gdal_sys::GDALDataType::GDT_Float64,
                options.as_mut_ptr(),
            )
        };
        if err != gdal_sys::CPLErr::CE_None {
            return Err(format!("cannot allocate the warp window: {}", last_gdal_error()));
        }
    }
    Ok(target)
}

/// Which target cells have their centre outside the source raster.
///
/// GDAL's area kernels (average, mode, ...) clamp source rows and columns to the source window of each
/// processing chunk: for a window of a few rows, cells far outside the source footprint get the values of its
/// edge (seen with GDAL 3.6 on `lc.tif`, 20 cells past its northern edge). A cell is kept only when its centre
/// falls inside the source, the rule that point kernels follow anyway.
fn centres_outside(source: &Dataset, target: &Dataset) -> Result<Vec<bool>, String> {
    let (width, rows) = target.raster_size();
    let (src_w, src_h) = source.raster_size();
    let mut outside = Vec::with_capacity(width * rows);
    // SAFETY: both datasets are open for the duration; the transformer is destroyed before returning; the
    // coordinate and success arrays hold `width` elements, as passed.
    unsafe {
        gdal_sys::CPLErrorReset();
        let transformer = gdal_sys::GDALCreateGenImgProjTransformer2(
            source.c_dataset(),
            target.c_dataset(),
            ptr::null_mut(),
        );
        if transformer.is_null() {
            return Err(last_gdal_error());
        }
        let mut xs = vec![0.0f64; width];
        let mut ys = vec![0.0f64; width];
        let mut zs = vec![0.0f64; width];
        let mut ok = vec![0i32; width];
        for row in 0..rows {
            for (col, (x, y)) in xs.iter_mut().zip(ys.iter_mut()).enumerate() {
                *x = col as f64 + 0.5;
                *y = row as f64 + 0.5;
            }
            zs.fill(0.0);
            gdal_sys::GDALGenImgProjTransform(
                transformer,
                1,
                width as i32,
                xs.as_mut_ptr(),
                ys.as_mut_ptr(),
                zs.as_mut_ptr(),
                ok.as_mut_ptr(),
            );
            for col in 0..width {
                let inside = ok[col] != 0
                    && (0.0..src_w as f64).contains(&xs[col])
                    && (0.0..src_h as f64).contains(&ys[col]);
                outside.push(!inside);
            }
        }
        gdal_sys::GDALDestroyGenImgProjTransformer(transformer);
    }
    Ok(outside)
}

/// The type GDAL's kernels compute in: the one `gdalwarp` picks for a Float32 output (the union of the source's
/// type and Float32), Float64 only for sources whose values Float32 does not hold exactly. Cubes store
/// continuous values as float32, and GDAL's bilinear kernel has a fast path for Float32 only (three times
/// faster on ERA5-like hourly grids).
fn working_type(data_type: GdalDataType) -> &'static str {
    match data_type {
        GdalDataType::UInt8 | GdalDataType::UInt16 | GdalDataType::Int16 | GdalDataType::Float32 => "Float32",
        _ => "Float64",
    }
}

/// `GDALWarp` with the options `gdalwarp` would take, plus what makes a window give the same pixels as a
/// whole-grid warp: an exact transformation (`-et 0`) and a fixed resampling scale (`XSCALE`/`YSCALE`: GDAL
/// otherwise derives the footprint of averaging and anti-aliasing kernels from each chunk's shape).
/// Cells no source pixel reaches keep the NaN they start with (`INIT_DEST=NaN`); the target has no nodata
/// value, because a destination nodata mask takes GDAL off its fast kernels and changes no pixel here (a
/// kernel writes a cell only from valid source pixels, with full weight).
fn run_gdal_warp(
    source: &Dataset,
    target: &Dataset,
    resampling: Resampling,
    scale: (f64, f64),
    working_type: &str,
) -> Result<(), String> {
    let args = [
        "-r",
        resampling.gdal_name(),
        "-et",
        "0",
        "-wt",
        working_type,
        "-wo",
        "INIT_DEST=NaN",
        "-dstnodata",
        "None",
        "-wo",
        &format!("XSCALE={}", scale.0),
        "-wo",
        &format!("YSCALE={}", scale.1),
    ];
    let cstrings: Vec<CString> = args.iter().map(|a| CString::new(*a).expect("no NUL")).collect();
    let mut argv: Vec<*mut c_char> = cstrings.iter().map(|c| c.as_ptr().cast_mut()).collect();
    argv.push(ptr::null_mut());
    // SAFETY: argv is a NULL-terminated array of valid C strings that outlive the call; the option struct is
    // freed below; source and target are open datasets owned by the caller for the duration of the call.
    unsafe {
        gdal_sys::CPLErrorReset();
        let options = gdal_sys::GDALWarpAppOptionsNew(argv.as_mut_ptr(), ptr::null_mut());
        if options.is_null() {
            return Err(last_gdal_error());
        }
        let mut sources = [source.c_dataset()];
        let mut usage_error: i32 = 0;
        let result = gdal_sys::GDALWarp(
            ptr::null(),
            target.c_dataset(),
            1,
            sources.as_mut_ptr(),
            options,
            &raw mut usage_error,
        );
        gdal_sys::GDALWarpAppOptionsFree(options);
        if result.is_null() || usage_error != 0 {
            return Err(last_gdal_error());
        }
    }
    Ok(())
}

/// The source's cell size in degrees, as `gdalwarp -t_srs EPSG:4326` would choose it (`GDALSuggestedWarpOutput`).
///
/// # Errors
/// [`SourceError::Gdal`] when GDAL cannot transform the file's extent to lon/lat.
pub fn native_resolution(
    file: &FileView,
    data_type: GdalDataType,
    nodata: Option<f64>,
) -> Result<(f64, f64), SourceError> {
    let (gt, _) = suggested_output(file, data_type, nodata)?;
    Ok((gt[1], gt[5].abs()))
}

/// `[west, south, east, north]` of the file in lon/lat, as `gdalwarp -t_srs EPSG:4326` would cover it
/// (a 0…360° grid reaches from −360°, with its mosaicked copy).
///
/// # Errors
/// [`SourceError::Gdal`] when GDAL cannot transform the file's extent to lon/lat.
pub fn lonlat_bounds(
    file: &FileView,
    data_type: GdalDataType,
    nodata: Option<f64>,
) -> Result<[f64; 4], SourceError> {
    let (gt, (pixels, lines)) = suggested_output(file, data_type, nodata)?;
    Ok([gt[0], gt[3] + f64::from(lines) * gt[5], gt[0] + f64::from(pixels) * gt[1], gt[3]])
}

/// `GDALSuggestedWarpOutput` of the file to EPSG:4326: a geotransform and `(pixels, lines)`.
fn suggested_output(
    file: &FileView,
    data_type: GdalDataType,
    nodata: Option<f64>,
) -> Result<([f64; 6], (i32, i32)), SourceError> {
    let fail = |message: String| SourceError::Gdal { path: file.path.clone(), message };
    let source = Dataset::open(vrt_xml(&[(file, 1)], data_type, nodata, None))
        .map_err(|e| fail(format!("cannot open it through a VRT: {e}")))?;
    let option = CString::new(format!("DST_SRS={}", target_wkt())).expect("no NUL");
    let mut options = [option.as_ptr().cast_mut(), ptr::null_mut()];
    let mut gt = [0.0f64; 6];
    let (mut pixels, mut lines) = (0i32, 0i32);
    // SAFETY: the options array is NULL-terminated and outlives the call; the transformer is destroyed
    // before returning; gt has the 6 elements GDALSuggestedWarpOutput writes.
    let err = unsafe {
        gdal_sys::CPLErrorReset();
        let transformer = gdal_sys::GDALCreateGenImgProjTransformer2(
            source.c_dataset(),
            ptr::null_mut(),
            options.as_mut_ptr(),
        );
        if transformer.is_null() {
            return Err(fail(format!("cannot transform it to lon/lat: {}", last_gdal_error())));
        }
        let err = gdal_sys::GDALSuggestedWarpOutput(
            source.c_dataset(),
            Some(gdal_sys::GDALGenImgProjTransform),
            transformer,
            gt.as_mut_ptr(),
            &raw mut pixels,
            &raw mut lines,
        );
        gdal_sys::GDALDestroyGenImgProjTransformer(transformer);
        err
    };
    if err != gdal_sys::CPLErr::CE_None || gt[1].is_nan() || gt[1] <= 0.0 {
        return Err(fail(format!("cannot find its extent in lon/lat: {}", last_gdal_error())));
    }
    Ok((gt, (pixels, lines)))
}

fn last_gdal_error() -> String {
    // SAFETY: CPLGetLastErrorMsg returns a pointer to a thread-local NUL-terminated string (never NULL).
    let msg = unsafe { std::ffi::CStr::from_ptr(gdal_sys::CPLGetLastErrorMsg()) };
    let msg = msg.to_string_lossy();
    if msg.is_empty() { "unknown GDAL error".to_string() } else { msg.into_owned() }
}
