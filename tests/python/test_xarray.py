"""Cubes written by `cubeload` open correctly with real xarray (zarr 3 backend).

Each test generates its cube from the real rasters in ../shared/data and compares what xarray decodes with an
independent reference: pandas date ranges, the source's own times decoded by xarray/cftime, the `gdalwarp`
program's warp of the same source onto the same grid, and the zarr-python view of the arrays on disk.

Run: `.venv/bin/python -m pytest tests/python -q` (scripts/setup.sh installs pytest and netCDF4 into .venv).
"""

import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

ERA5 = "era5-2mt-2019-03-uk.grib"
ERA5_BBOX = (-8.0, 51.0, 0.0, 57.0)  # W, S, E, N
ERA5_RES = 0.1


def q(value) -> str:
    """A path as a YAML scalar (a JSON string is a valid double-quoted YAML scalar)."""
    return json.dumps(str(value))


def era5_cube(gen_cube, shared_data):
    west, south, east, north = ERA5_BBOX
    return gen_cube(
        f"grid: {{ bbox: [{west}, {south}, {east}, {north}], resolution: {ERA5_RES} }}\n"
        "time: { from: t2m }\n"
        "layout: { kind: pixel_series, batch: 64 }\n"
        "variables:\n"
        f"  t2m: {{ path: {q(shared_data / ERA5)}, resampling: bilinear }}\n"
    )


def gdalinfo_json(run_tool, path, cwd):
    """`gdalinfo -json`; the GRIB driver of GDAL 3.6 prints warnings to stdout before the JSON document."""
    text = run_tool(["gdalinfo", "-json", path], cwd).stdout
    start = re.search(r"^\{", text, re.MULTILINE)
    assert start, f"no JSON in gdalinfo output:\n{text}"
    return json.loads(text[start.start() :])


def reference_planes(ref: xr.Dataset):
    """The bands of a GDAL-written NetCDF as a list of (lat, lon) DataArrays, whichever way GDAL laid them
    out: one variable per band (Band1..BandN) or one variable with a band dimension."""
    band_dims = [d for d in ref.dims if d not in ("lat", "lon")]
    if band_dims:
        (band_dim,) = band_dims
        (var,) = [v for v in ref.data_vars.values() if band_dim in v.dims]
        return [var.isel({band_dim: i}) for i in range(ref.sizes[band_dim])]
    names = [n for n in ref.data_vars if re.fullmatch(r"Band\d+", str(n))]
    names.sort(key=lambda n: int(str(n)[4:]))
    return [ref[n] for n in names]


def variable_meta(meta, name):
    (entry,) = [v for v in meta["variables"] if v["name"] == name]
    return entry


# ---- 1. ERA5 GRIB: coordinates, CRS and values ------------------------------------------------------------


def test_era5_grib_coordinates_decode(gen_cube, shared_data):
    cube = era5_cube(gen_cube, shared_data)
    root = json.loads((cube / "zarr.json").read_text())
    assert "consolidated_metadata" in root, "the root zarr.json carries consolidated metadata"
    ds = xr.open_zarr(cube, consolidated=True)

    assert ds["t2m"].dims == ("time", "lat", "lon")
    assert ds["t2m"].dtype == np.float32

    # Time: hourly valid times of the 744 GRIB messages, decoded by xarray from the CF units.
    assert np.issubdtype(ds["time"].dtype, np.datetime64), ds["time"].dtype
    expected = pd.date_range("2019-03-01", periods=744, freq="h")
    actual = pd.DatetimeIndex(ds["time"].values)
    assert actual.equals(expected), f"{actual[:3]} … {actual[-3:]}"

    # Grid: north-up rows (lat strictly descending), lon ascending, cell centres half a cell inside the bbox,
    # a constant step of one resolution (also over the padding rows/cols beyond the bbox).
    west, south, east, north = ERA5_BBOX
    lat, lon = ds["lat"].values, ds["lon"].values
    assert ds.sizes["lat"] >= round((north - south) / ERA5_RES)
    assert ds.sizes["lon"] >= round((east - west) / ERA5_RES)
    assert np.all(np.diff(lat) < 0), "lat strictly descending"
    assert np.all(np.diff(lon) > 0), "lon strictly ascending"
    np.testing.assert_allclose(np.diff(lat), -ERA5_RES, atol=1e-9)
    np.testing.assert_allclose(np.diff(lon), ERA5_RES, atol=1e-9)
    assert lat[0] == pytest.approx(north - ERA5_RES / 2, abs=1e-9)
    assert lon[0] == pytest.approx(west + ERA5_RES / 2, abs=1e-9)
    assert lat[59] == pytest.approx(south + ERA5_RES / 2, abs=1e-9)
    assert lon[79] == pytest.approx(east - ERA5_RES / 2, abs=1e-9)

    # CRS: spatial_ref is a coordinate (not a data variable) with a WKT for WGS 84.
    assert "spatial_ref" in ds.coords
    assert "spatial_ref" not in ds.data_vars
    assert "spatial_ref" in ds["t2m"].coords
    assert "WGS 84" in ds["spatial_ref"].attrs["crs_wkt"]


def test_era5_grib_values_equal_gdalwarp_bilinear(gen_cube, shared_data, run_tool, tmp_path):
    cube = era5_cube(gen_cube, shared_data)
    grib = shared_data / ERA5
    west, south, east, north = ERA5_BBOX

    # The warper's resampling scale, fixed as cubeload fixes it: the source's native cell size in degrees
    # (as `gdalwarp -t_srs EPSG:4326` chooses it) over the target resolution.
    native = tmp_path / "native.vrt"
    run_tool(["gdalwarp", "-q", "-overwrite", "-of", "VRT", "-t_srs", "EPSG:4326", grib, native], tmp_path)
    gt = gdalinfo_json(run_tool, native, tmp_path)["geoTransform"]
    xscale, yscale = gt[1] / ERA5_RES, abs(gt[5]) / ERA5_RES
    ref_path = tmp_path / "ref.nc"
    run_tool(
        ["gdalwarp", "-q", "-overwrite", "-of", "netCDF", "-ot", "Float64", "-t_srs", "EPSG:4326"]
        + ["-te", west, south, east, north, "-tr", ERA5_RES, ERA5_RES]
        + ["-r", "bilinear", "-et", "0", "-dstnodata", "nan"]
        + ["-wo", f"XSCALE={xscale}", "-wo", f"YSCALE={yscale}", grib, ref_path],
        tmp_path,
        env={"GRIB_NORMALIZE_UNITS": "NO"},
    )

    with xr.open_dataset(ref_path, engine="netcdf4") as ref:
        # GDAL's netCDF writer may store rows south to north: order them like the cube.
        ref = ref.sortby("lat", ascending=False)
        planes = reference_planes(ref)
        assert len(planes) == 744, "one band per GRIB message"
        ds = xr.open_zarr(cube)
        t2m = ds["t2m"].isel(lat=slice(0, 60), lon=slice(0, 80))
        assert t2m.shape == (744, 60, 80)
        np.testing.assert_allclose(t2m["lat"].values, ref["lat"].values, atol=1e-9)
        np.testing.assert_allclose(t2m["lon"].values, ref["lon"].values, atol=1e-9)
        for t in (0, 1, 100, 743):
            expected = planes[t].transpose("lat", "lon").values
            actual = t2m.isel(time=t).values.astype(np.float64)
            assert not np.isnan(expected).any(), f"step {t}: ERA5 covers the whole bbox"
            assert not np.isnan(actual).any(), f"step {t}: cube has NaN inside the bbox"
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4, err_msg=f"t2m step {t}")
        # Kelvin, whatever GDAL's GRIB unit label says.
        assert 260.0 < float(t2m.isel(time=0).min()) and float(t2m.isel(time=0).max()) < 300.0


# ---- 2. 360_day calendar ----------------------------------------------------------------------------------


def test_360_day_calendar_decodes_to_source_dates(gen_cube, shared_data):
    src = shared_data / "tos_O1_2001-2002.nc"
    cube = gen_cube(
        "grid: { bbox: [60, -20, 90, 0], resolution: 1.0 }\n"
        "time: { from: tos }\n"
        "layout: { kind: pixel_series, batch: 64 }\n"
        "variables:\n"
        f"  tos: {{ path: {q(src)}, variable: tos }}\n"
    )
    ds = xr.open_zarr(cube)
    assert ds["tos"].dims == ("time", "lat", "lon")
    assert np.issubdtype(ds["time"].dtype, np.datetime64), ds["time"].dtype
    times = pd.DatetimeIndex(ds["time"].values)
    assert len(times) == 24
    expected = pd.DatetimeIndex([f"{y}-{m:02d}-16" for y in (2001, 2002) for m in range(1, 13)])
    assert times.equals(expected), list(times)

    # The source's own times, decoded by xarray with cftime in its 360_day calendar.
    coder = xr.coders.CFDatetimeCoder(use_cftime=True)
    with xr.open_dataset(src, engine="netcdf4", decode_times=coder) as source:
        assert source["time"].encoding.get("calendar") == "360_day"
        source_times = source["time"].values
    assert len(source_times) == len(times)
    for i, (s, c) in enumerate(zip(source_times, times)):
        assert (s.year, s.month, s.day, s.hour, s.minute, s.second) == (
            c.year,
            c.month,
            c.day,
            c.hour,
            c.minute,
            c.second,
        ), f"step {i}: source {s}, cube {c}"


# ---- 3. demo cube -----------------------------------------------------------------------------------------


def test_demo_cube_static_layer_stats_and_padding(run_cubeload, tmp_path):
    demo = tmp_path / "demo"
    run_cubeload("demo", "--dir", demo)
    ds = xr.open_zarr(demo / "demo.zarr")

    assert ds["landcover"].dims == ("lat", "lon"), "a static layer has no time axis"
    # Stored as integers; the declared fill value (`_FillValue`, CF) is missing for xarray as for the loader,
    # and the codes as stored without decoding.
    assert np.issubdtype(ds["landcover"].encoding["dtype"], np.integer), ds["landcover"].encoding
    raw = xr.open_zarr(demo / "demo.zarr", mask_and_scale=False)["landcover"]
    assert np.issubdtype(raw.dtype, np.integer), raw.dtype
    fill = variable_meta(ds.attrs["cubeload"], "landcover")["fill_value"]
    assert raw.attrs["_FillValue"] == fill and (raw.values == fill).any()
    np.testing.assert_array_equal(np.isnan(ds["landcover"].values), raw.values == fill)
    assert ds["t2m"].dims == ("time", "lat", "lon")
    assert ds["ndvi"].dims == ("time", "lat", "lon")

    assert np.issubdtype(ds["time"].dtype, np.datetime64), ds["time"].dtype
    hourly = pd.date_range("2024-06-01", periods=ds.sizes["time"], freq="h")
    assert pd.DatetimeIndex(ds["time"].values).equals(hourly)

    meta = ds.attrs["cubeload"]
    assert isinstance(meta, dict)
    assert meta["complete"] is True
    nt, ny, nx = meta["shape"]
    assert nt == ds.sizes["time"]
    assert ny <= ds.sizes["lat"] and nx <= ds.sizes["lon"]
    assert (ny, nx) != (ds.sizes["lat"], ds.sizes["lon"]), "the demo grid is padded (the check below bites)"

    t2m = ds["t2m"].values
    valid = t2m[:, :ny, :nx].astype(np.float64)
    stats = variable_meta(meta, "t2m")["stats"]
    assert stats["count"] == np.count_nonzero(~np.isnan(valid))
    assert np.nanmean(valid) == pytest.approx(stats["mean"], rel=1e-3)
    # The extremes are values of the cube, as stored (float32), not those of the warp before storing.
    assert (stats["min"], stats["max"]) == (np.nanmin(valid), np.nanmax(valid))
    assert np.isnan(t2m[:, ny:, :]).all(), "padding rows of t2m are NaN"
    assert np.isnan(t2m[:, :, nx:]).all(), "padding cols of t2m are NaN"


# ---- 4. image_sequence layout -----------------------------------------------------------------------------


def test_image_sequence_cube_chunks_and_irregular_times(gen_cube, shared_data):
    src = shared_data / "converted" / "eopatch_S2_NDVI_CLM_2015-2017_utm33n.nc"
    cube = gen_cube(
        "grid: { bbox: [14.5513, 45.8659, 14.5643, 45.875], resolution: 0.0001 }\n"
        "time: { from: ndvi }\n"
        "layout: { kind: image_sequence, seq_len: 8, patch: [32, 32], batch: 4 }\n"
        "variables:\n"
        f"  ndvi: {{ path: {q(src)}, variable: NDVI }}\n"
    )
    ds = xr.open_zarr(cube)
    assert ds["ndvi"].dims == ("time", "lat", "lon")
    assert ds["ndvi"].dtype == np.float32

    # One batch = 2 × 2 patches of 32 × 32 pixels × a sequence of 8 steps, as zarr stores it.
    ndvi = zarr.open_array(str(cube / "ndvi"), mode="r")
    assert ndvi.chunks == (8, 64, 64), f"chunks {ndvi.chunks}, shards {ndvi.shards}"
    if ndvi.shards is not None:
        assert all(s % c == 0 for s, c in zip(ndvi.shards, ndvi.chunks)), ndvi.shards
    assert ndvi.shape == tuple(ds["ndvi"].shape)
    assert ds["ndvi"].encoding["chunks"] == (8, 64, 64)

    # 68 irregular acquisitions padded to whole sequences of 8.
    assert np.issubdtype(ds["time"].dtype, np.datetime64), ds["time"].dtype
    times = pd.DatetimeIndex(ds["time"].values)
    assert len(times) == 72
    dates = times[:68]
    assert (np.diff(dates.asi8) > 0).all(), "the 68 acquisitions are strictly increasing"
    assert (dates.normalize() == pd.Timestamp("2015-12-08")).sum() == 2, "two acquisitions on 2015-12-08"
    with xr.open_dataset(src, engine="netcdf4") as source:
        source_times = pd.DatetimeIndex(source["time"].values)
    assert dates.equals(source_times), "the acquisitions are the source's own times"


def test_shuffled_pixel_series_opens_sample_major(gen_cube, shared_data):
    """`order: shuffled`: (sample, time) arrays with lat(sample)/lon(sample) coordinates; each sample's series
    equals the tiled cube's series at that pixel."""
    body = lambda order: (  # noqa: E731
        "grid: { bbox: [-8.0, 51.0, 0.0, 57.0], resolution: 0.25 }\n"
        "time: { from: t2m }\n"
        f"layout: {{ kind: pixel_series, batch: 64{order} }}\n"
        "variables:\n"
        f"  t2m: {{ path: {q(shared_data / 'era5-2mt-2019-03-uk.grib')} }}\n"
    )
    tiled = xr.open_zarr(gen_cube(body("")))
    shuffled = xr.open_zarr(gen_cube(body(", order: shuffled, seed: 3"), name="shuffled"))
    assert shuffled.t2m.dims == ("sample", "time")
    assert "lat" in shuffled.coords and "lon" in shuffled.coords
    assert shuffled.lat.dims == ("sample",)
    n = 24 * 32
    assert shuffled.sizes["sample"] == 768 and n == 768
    lat, lon = shuffled.lat.values, shuffled.lon.values
    assert not np.isnan(lat).any()
    # The samples are a permutation of the grid cells, not in grid order.
    cells = {(round(a, 6), round(o, 6)) for a, o in zip(lat, lon)}
    assert len(cells) == n
    assert not np.all(np.diff(lat) <= 0), "samples are shuffled"
    expected = tiled.t2m.sel(lat=xr.DataArray(lat, dims="sample"), lon=xr.DataArray(lon, dims="sample"))
    np.testing.assert_array_equal(shuffled.t2m.transpose("sample", "time").values, expected.transpose("sample", "time").values)


def test_multiresolution_levels_open_as_groups_and_match_xarrays_own_regridding(gen_cube, shared_data, run_tool, tmp_path):
    """A multi-resolution cube: ERA5 kept at 0.5° (a 5 × 5 level) and as daily means (a 24-step level) beside
    the 0.1° hourly field. Each level opens with xarray as a group with its own coordinates; the daily level
    equals xarray's own daily resample of the hourly field, and the 0.5° level gdalwarp's warp at 0.5°."""
    west, south, east, north = ERA5_BBOX
    grib = shared_data / ERA5
    cube = gen_cube(
        f"grid: {{ bbox: [{west}, {south}, {east}, {north}], resolution: {ERA5_RES} }}\n"
        "time: { start: 2019-03-01T00:00:00Z, end: 2019-03-31T23:00:00Z, step: 1h }\n"
        "layout: { kind: pixel_series, batch: 64, multires: true }\n"
        "variables:\n"
        f"  t2m: {{ path: {q(grib)}, resampling: bilinear }}\n"
        f"  t2m_coarse: {{ path: {q(grib)}, resampling: bilinear, resolution: 0.5 }}\n"
        f"  t2m_daily: {{ path: {q(grib)}, resampling: bilinear, time_step: 1d, aggregation: mean }}\n"
    )
    root = xr.open_zarr(cube)
    assert set(root.data_vars) == {"t2m"}, "coarser variables live in their level groups"
    coarse = xr.open_zarr(cube, group="coarse_5")
    daily = xr.open_zarr(cube, group="coarse_t24")
    # 16 × 12 cells of 0.5°, stored padded to whole level chunks (8 × 8 cells = 5 × 5 batches) as the
    # target arrays are.
    assert coarse.t2m_coarse.dims == ("time", "lat", "lon") and dict(coarse.sizes) == {"time": 744, "lat": 16, "lon": 16}
    np.testing.assert_allclose(coarse.lat.values[:12], np.arange(56.75, 51.0, -0.5))
    np.testing.assert_allclose(coarse.lon.values, np.arange(-7.75, 0.0, 0.5))
    assert daily.sizes["time"] == 31
    np.testing.assert_array_equal(daily.time.values, pd.date_range("2019-03-01", periods=31, freq="D").values)

    # The daily level: the mean of the 24 hourly steps of each day, as xarray computes it from the hourly field.
    hourly = root.t2m.isel(lat=slice(0, 60), lon=slice(0, 80)).load()
    expected = hourly.resample(time="1D").mean()
    got = daily.t2m_daily.isel(lat=slice(0, 60), lon=slice(0, 80)).load()
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-6)

    # The 0.5° level: gdalwarp's bilinear warp onto the level grid (resampling scale fixed as above).
    native = tmp_path / "native.vrt"
    run_tool(["gdalwarp", "-q", "-overwrite", "-of", "VRT", "-t_srs", "EPSG:4326", grib, native], tmp_path)
    gt = gdalinfo_json(run_tool, native, tmp_path)["geoTransform"]
    ref_path = tmp_path / "ref.nc"
    run_tool(
        ["gdalwarp", "-q", "-overwrite", "-of", "netCDF", "-ot", "Float64", "-t_srs", "EPSG:4326"]
        + ["-te", west, south, east, north, "-tr", 0.5, 0.5, "-r", "bilinear", "-et", "0", "-dstnodata", "nan"]
        + ["-wo", f"XSCALE={gt[1] / 0.5}", "-wo", f"YSCALE={abs(gt[5]) / 0.5}", grib, ref_path],
        tmp_path,
        env={"GRIB_NORMALIZE_UNITS": "NO"},
    )
    with xr.open_dataset(ref_path, engine="netcdf4") as ref:
        planes = reference_planes(ref.sortby("lat", ascending=False))
        for t in (0, 100, 743):
            expected = planes[t].transpose("lat", "lon").values
            np.testing.assert_allclose(coarse.t2m_coarse.isel(time=t, lat=slice(0, 12)).values, expected, rtol=1e-6)

    # The validity index opens too: each level's chunks are counted along dimensions of its own.
    index = xr.open_zarr(cube, group="cubeload_index")
    assert index.t2m.dims == ("time_batch", "lat_batch", "lon_batch")
    assert index.t2m_coarse.dims == ("time_batch_coarse_5", "lat_batch_coarse_5", "lon_batch_coarse_5")
    assert index.sizes["time_batch_coarse_t24"] == 1 and float(index.t2m.min()) > 0


# ---- Band selection and missing values ---------------------------------------------------------------------


def test_a_chosen_band_is_read_with_its_own_type_packing_and_nodata(gen_cube, tmp_path):
    """`band: 2` of a file whose bands differ: band 2's data type, scale, offset and nodata, not band 1's."""
    raw1 = np.arange(16, dtype="u1").reshape(4, 4)
    raw2 = (np.arange(16, dtype="<f4") * 66.7 + 0.25).reshape(4, 4)
    raw2[0, 0] = -5.0  # band 2's nodata
    raw1.tofile(tmp_path / "b1.raw")
    raw2.tofile(tmp_path / "b2.raw")

    def band(i, dtype, name, size, extra):
        return (
            f'<VRTRasterBand dataType="{dtype}" band="{i}" subClass="VRTRawRasterBand">{extra}'
            f'<SourceFilename relativetoVRT="1">{name}</SourceFilename><ImageOffset>0</ImageOffset>'
            f"<PixelOffset>{size}</PixelOffset><LineOffset>{4 * size}</LineOffset><ByteOrder>LSB</ByteOrder>"
            "</VRTRasterBand>"
        )

    (tmp_path / "bands.vrt").write_text(
        '<VRTDataset rasterXSize="4" rasterYSize="4"><SRS>EPSG:4326</SRS>'
        "<GeoTransform>10,1,0,14,0,-1</GeoTransform>"
        + band(1, "Byte", "b1.raw", 1, "")
        + band(2, "Float32", "b2.raw", 4, "<NoDataValue>-5</NoDataValue><Offset>100</Offset><Scale>0.5</Scale>")
        + "</VRTDataset>"
    )
    source = q(tmp_path / "bands.vrt")
    cube = gen_cube(
        "grid: { bbox: [10.0, 10.0, 14.0, 14.0], resolution: 1.0 }\n"
        "layout: { kind: pixel_series, batch: 16, tile: [4, 4] }\n"
        "variables:\n"
        f"  b1: {{ path: {source}, band: 1, static: true, resampling: nearest }}\n"
        f"  b2: {{ path: {source}, band: 2, static: true, resampling: nearest }}\n"
    )
    ds = xr.open_zarr(cube)
    expected = raw2.astype(np.float64) * 0.5 + 100.0
    expected[0, 0] = np.nan
    np.testing.assert_allclose(ds.b2.values, expected, rtol=1e-6)
    np.testing.assert_array_equal(ds.b1.values, raw1.astype(np.float32))


@pytest.mark.filterwarnings("ignore:variable 'x' has multiple fill values")
def test_a_netcdf_missing_value_beside_a_different_fill_value_is_missing_as_xarray_reads_it(gen_cube, tmp_path):
    """GDAL masks `_FillValue` only; xarray (CF) masks `missing_value` too, and so does the cube."""
    import netCDF4

    path = tmp_path / "both.nc"
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("lat", 4)
        nc.createDimension("lon", 4)
        lat = nc.createVariable("lat", "f8", ("lat",))
        lat.units, lat.standard_name = "degrees_north", "latitude"
        lat[:] = [13.5, 12.5, 11.5, 10.5]
        lon = nc.createVariable("lon", "f8", ("lon",))
        lon.units, lon.standard_name = "degrees_east", "longitude"
        lon[:] = [10.5, 11.5, 12.5, 13.5]
        x = nc.createVariable("x", "f4", ("lat", "lon"), fill_value=np.float32(-999))
        x.set_auto_maskandscale(False)
        x.missing_value = np.float32(-9999)
        values = np.arange(16, dtype="f4").reshape(4, 4)
        values[0, 0], values[2, 3] = -999, -9999
        x[:] = values
    cube = gen_cube(
        "grid: { bbox: [10.0, 10.0, 14.0, 14.0], resolution: 1.0 }\n"
        "layout: { kind: pixel_series, batch: 16, tile: [4, 4] }\n"
        "variables:\n"
        f"  x: {{ path: {q(path)}, variable: x, static: true, resampling: nearest }}\n"
    )
    reference = xr.open_dataset(path).x.values
    assert np.isnan(reference[0, 0]) and np.isnan(reference[2, 3])
    cube_values = xr.open_zarr(cube).x.values
    np.testing.assert_array_equal(cube_values, reference)
    # The statistics (and so `normalize`) leave it out too.
    meta = json.loads((cube / "zarr.json").read_text())["attributes"]["cubeload"]
    assert variable_meta(meta, "x")["stats"]["min"] == 1.0


# ---- 9. verify against another writer -------------------------------------------------------------------


def test_a_validity_index_rewritten_by_zarr_python_is_reported_by_verify(gen_cube, shared_data, cubeload_bin):
    """The validity index is stored unsharded with the `crc32c` codec: each file ends with the CRC32C of its
    own bytes, which gives every such file one CRC32C. The seal recorded that CRC32C, so an index rewritten
    with another value (by zarr-python, its checksum valid) passed `verify`, and the loader skipped a batch
    full of values without a word."""
    cube = era5_cube(gen_cube, shared_data)
    assert subprocess.run([cubeload_bin, "verify", cube], capture_output=True).returncode == 0
    index = zarr.open_array(cube / "cubeload_index" / "t2m", mode="r+")
    assert index[(0,) * index.ndim] > 0
    index[(0,) * index.ndim] = 0.0
    out = subprocess.run([cubeload_bin, "verify", cube], capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cubeload_index/t2m" in out.stdout + out.stderr and "checksum mismatch" in out.stdout + out.stderr
