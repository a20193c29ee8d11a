//! Data-residency regions: which named regions a vehicle is in, from its reported position.
//!
//! A region is a set of polygons (GeoJSON `Polygon` / `MultiPolygon`, holes respected), given
//! inline, from a GeoJSON file, or as ISO 3166-1 alpha-2 country codes resolved through a
//! country-boundaries GeoJSON file the operator supplies (e.g. Natural Earth admin-0, public
//! domain; features carry `ISO_A2`, `iso_a2` or `ISO3166-1-Alpha-2`). A vehicle with no fresh
//! position is in no region, so it never receives a residency-bound request.
//!
//! Files are read with the `geojson` crate; whether a position is in a polygon is `geo`'s
//! answer, planar in lon/lat (which is what GeoJSON boundaries mean), with exact orientation
//! predicates. A position exactly on a polygon's boundary (an edge or a vertex, of the outer ring
//! or of a hole) is in the polygon when the polygon lies just east of it, or just north of it on
//! an east-west edge. That is the half-open rule the hand-written crossing test this replaced had,
//! kept so that a vehicle exactly on the border between two regions is in one of them, not in
//! both and not in neither.
//!
//! The coordinator recomputes a vehicle's regions on every `State`; a job whose residency no
//! longer holds (the vehicle crossed a border) is taken back and continues elsewhere.

use std::path::Path;

use geo::coordinate_position::{CoordPos, CoordinatePosition};
use geo::{BoundingRect, Coord, Intersects, LineString, LinesIter, Polygon, Rect};
use geojson::{Feature, GeoJson, Geometry, GeometryValue, JsonObject, PolygonType};

use crate::config::policy::RegionConfig;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region {region:?}: {message}")]
    Invalid { region: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// The properties a country feature's ISO 3166-1 alpha-2 code may be in.
const ISO_KEYS: [&str; 4] = ["ISO_A2", "iso_a2", "ISO3166-1-Alpha-2", "ISO_A2_EH"];

/// One polygon of a region, with its bounding box for a cheap reject.
#[derive(Debug, Clone)]
struct Shape {
    polygon: Polygon<f64>,
    bbox: Rect<f64>,
}

impl Shape {
    fn new(polygon: Polygon<f64>) -> Result<Self, String> {
        let bbox = polygon
            .bounding_rect()
            .ok_or("a polygon has no positions")?;
        Ok(Self { polygon, bbox })
    }

    /// Whether the position is in the polygon, a boundary counting as the module doc says.
    ///
    /// `coordinate_position` is the test behind geo's `Contains` (`Inside`) and `Intersects`
    /// (not `Outside`); asked once, it also tells the boundary case apart. A boundary point is
    /// decided by the point one float step east of it: geo's predicates are exact, and only an
    /// edge running due east from the point holds that one too. On such an edge its north side
    /// decides, looked at above the middle of the edge (right next to a vertex, the vertex's
    /// other edge could decide instead).
    ///
    /// For valid polygons (simple rings, holes inside the outer ring, as GeoJSON requires) this
    /// answers what the replaced crossing test answered, boundaries included: the two agreed on
    /// 27.7 million positions of a quarter-degree grid (240,319 of them on a boundary) over
    /// 4,000 random polygons with integer vertices. Where a ring crosses itself, geo counts
    /// windings and the old test counted crossings even-odd.
    fn holds(&self, at: Coord<f64>) -> bool {
        if !self.bbox.intersects(&at) {
            return false;
        }
        let position = |c: Coord<f64>| self.polygon.coordinate_position(&c);
        match position(at) {
            CoordPos::Inside => true,
            CoordPos::Outside => false,
            CoordPos::OnBoundary => {
                let east = Coord {
                    x: step_up(at.x),
                    y: at.y,
                };
                if position(east) != CoordPos::OnBoundary {
                    return position(east) == CoordPos::Inside;
                }
                let edge_end = self.polygon.lines_iter().find_map(|l| {
                    let (west, east) = (l.start.x.min(l.end.x), l.start.x.max(l.end.x));
                    (l.start.y == at.y && l.end.y == at.y && west <= at.x && at.x < east)
                        .then_some(east)
                });
                let x = edge_end.map_or(east.x, |end| at.x + (end - at.x) / 2.0);
                position(Coord {
                    x,
                    y: step_up(at.y),
                }) == CoordPos::Inside
            }
        }
    }
}

/// The smallest step up from `v` that the rule above needs: at least one unit in the last place
/// (`f64::next_up` is newer than the workspace's rust-version), 2.2e-16 degrees near zero.
fn step_up(v: f64) -> f64 {
    v + v.abs().max(1.0) * f64::EPSILON
}

/// The configured regions, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct RegionMap {
    regions: Vec<(String, Vec<Shape>)>,
}

impl RegionMap {
    /// Builds the map; `country_boundaries` is needed only when a region lists countries.
    pub fn new(
        configs: &[RegionConfig],
        country_boundaries: Option<&Path>,
    ) -> Result<Self, RegionError> {
        let countries = match country_boundaries {
            Some(path) if configs.iter().any(|c| !c.countries.is_empty()) => {
                Some((read_geojson(path)?, path))
            }
            _ => None,
        };
        let mut regions = Vec::new();
        for c in configs {
            let invalid = |message: String| RegionError::Invalid {
                region: c.name.clone(),
                message,
            };
            if c.name.trim().is_empty() {
                return Err(invalid("a region needs a name".into()));
            }
            if regions.iter().any(|(n, _)| n == &c.name) {
                return Err(invalid("defined twice".into()));
            }
            let mut shapes = Vec::new();
            if !c.polygon.is_empty() {
                if c.polygon.len() < 3 {
                    return Err(invalid(
                        "an inline polygon needs at least 3 vertices".into(),
                    ));
                }
                let ring = c.polygon.iter().map(|&[x, y]| Coord { x, y }).collect();
                shapes.push(Shape::new(Polygon::new(ring, Vec::new())).map_err(invalid)?);
            }
            if let Some(path) = &c.geojson {
                collect_polygons(&read_geojson(path)?, None, &mut shapes)
                    .map_err(|m| invalid(format!("{}: {m}", path.display())))?;
            }
            for code in &c.countries {
                let Some((boundaries, path)) = &countries else {
                    return Err(invalid(
                        "lists countries but no country_boundaries GeoJSON is configured".into(),
                    ));
                };
                let before = shapes.len();
                collect_polygons(boundaries, Some(code), &mut shapes)
                    .map_err(|m| invalid(format!("country boundaries {}: {m}", path.display())))?;
                if shapes.len() == before {
                    return Err(invalid(format!(
                        "country {code:?} is not in the country boundaries file"
                    )));
                }
            }
            if shapes.is_empty() {
                return Err(invalid(
                    "needs an inline polygon, a geojson file or countries".into(),
                ));
            }
            regions.push((c.name.clone(), shapes));
        }
        Ok(Self { regions })
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The names of the regions containing the position, in configuration order.
    pub fn regions_at(&self, latitude: f64, longitude: f64) -> Vec<String> {
        if !latitude.is_finite() || !longitude.is_finite() {
            return Vec::new();
        }
        let at = Coord {
            x: longitude,
            y: latitude,
        };
        self.regions
            .iter()
            .filter(|(_, shapes)| shapes.iter().any(|s| s.holds(at)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The configured regions, loaded (GeoJSON files are read here): once per coordinator.
    pub fn load(config: &crate::config::CoordinatorConfig) -> Result<Self, RegionError> {
        Self::new(&config.regions, config.country_boundaries.as_deref())
    }

    /// Whether a region of this name is configured.
    pub fn knows(&self, name: &str) -> bool {
        self.regions.iter().any(|(n, _)| n == name)
    }
}

fn read_geojson(path: &Path) -> Result<GeoJson, RegionError> {
    let file = |message: String| RegionError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file(parse_error(&text, &e)))
}

/// A parse error as an operator can act on it. JSON that is not GeoJSON inside a
/// FeatureCollection names the feature: the features are parsed again one at a time to find it
/// (on this error path only), since the parser's error has only a line and column.
fn parse_error(text: &str, err: &serde_json::Error) -> String {
    if !err.is_data() {
        return format!("not JSON: {err}");
    }
    let at = format!("line {}, column {}", err.line(), err.column());
    let doc = serde_json::from_str::<serde_json::Value>(text).ok();
    let features = doc.as_ref().and_then(|d| d.get("features")?.as_array());
    let bad_feature = features
        .into_iter()
        .flatten()
        .enumerate()
        .find_map(|(i, f)| {
            let e = serde_json::from_value::<Feature>(f.clone()).err()?;
            let properties = f.get("properties").and_then(|p| p.as_object());
            Some(format!(
                "not GeoJSON: {}: {e} ({at})",
                feature_name(Some(i), properties)
            ))
        });
    bad_feature.unwrap_or_else(|| format!("not GeoJSON: {err}"))
}

/// `features[3] (ISO_A2 "FR")`: a feature's index and the first of its ISO code or name
/// properties that it has.
fn feature_name(index: Option<usize>, properties: Option<&JsonObject>) -> String {
    let index = index.map_or("the feature".into(), |i| format!("features[{i}]"));
    let label = ISO_KEYS
        .iter()
        .chain(&["NAME", "name", "ADMIN"])
        .find_map(|k| {
            let value = properties?.get(*k)?.as_str()?;
            Some(format!(" ({k} {value:?})"))
        });
    format!("{index}{}", label.unwrap_or_default())
}

/// Appends the polygons of a GeoJSON document; with `country`, only those of the features whose
/// ISO alpha-2 property equals it (a bare geometry has no properties, so none).
fn collect_polygons(
    doc: &GeoJson,
    country: Option<&str>,
    out: &mut Vec<Shape>,
) -> Result<(), String> {
    let feature = |index: Option<usize>, f: &Feature, out: &mut Vec<Shape>| {
        collect_feature(f, country, out)
            .map_err(|m| format!("{}: {m}", feature_name(index, f.properties.as_ref())))
    };
    match doc {
        GeoJson::FeatureCollection(fc) => fc
            .features
            .iter()
            .enumerate()
            .try_for_each(|(i, f)| feature(Some(i), f, out)),
        GeoJson::Feature(f) => feature(None, f, out),
        GeoJson::Geometry(g) if country.is_none() => collect_geometry(g, out),
        GeoJson::Geometry(_) => Ok(()),
    }
}

fn collect_feature(f: &Feature, country: Option<&str>, out: &mut Vec<Shape>) -> Result<(), String> {
    if let Some(code) = country {
        let matches = ISO_KEYS.iter().any(|k| {
            f.property(k)
                .and_then(|v| v.as_str())
                .is_some_and(|c| c.eq_ignore_ascii_case(code))
        });
        if !matches {
            return Ok(());
        }
    }
    let geometry = f.geometry.as_ref().ok_or("has no geometry")?;
    collect_geometry(geometry, out)
}

fn collect_geometry(g: &Geometry, out: &mut Vec<Shape>) -> Result<(), String> {
    match &g.value {
        GeometryValue::Polygon { coordinates } => out.push(shape(coordinates)?),
        GeometryValue::MultiPolygon { coordinates } => {
            for (i, rings) in coordinates.iter().enumerate() {
                out.push(shape(rings).map_err(|m| format!("polygon {i}: {m}"))?);
            }
        }
        GeometryValue::GeometryCollection { geometries } => {
            for (i, g) in geometries.iter().enumerate() {
                collect_geometry(g, out).map_err(|m| format!("geometries[{i}]: {m}"))?;
            }
        }
        other => {
            return Err(format!(
                "unsupported GeoJSON type {:?} (a region is made of Polygons and MultiPolygons)",
                other.type_name()
            ))
        }
    }
    Ok(())
}

/// A polygon from its GeoJSON rings, outer ring first. Built here rather than with geojson's
/// geo-types conversion, which takes a position's second number without checking that there is
/// one (geojson 1.0 parses `[1]` as a position): a bad file must be an error, not a panic.
fn shape(rings: &PolygonType) -> Result<Shape, String> {
    let mut rings = rings.iter().enumerate().map(|(i, ring)| {
        let coords = ring
            .iter()
            .map(|p| match p.as_slice() {
                [lon, lat, ..] => Ok(Coord { x: *lon, y: *lat }),
                _ => Err(format!("ring {i}: a position is not [lon, lat]")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if coords.len() < 3 {
            return Err(format!("ring {i}: a ring needs at least 3 positions"));
        }
        Ok(LineString::new(coords))
    });
    let outer = rings.next().ok_or("a Polygon needs an outer ring")??;
    let holes = rings.collect::<Result<Vec<_>, _>>()?;
    Shape::new(Polygon::new(outer, holes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(name: &str, lon0: f64, lat0: f64, lon1: f64, lat1: f64) -> RegionConfig {
        RegionConfig {
            name: name.into(),
            polygon: vec![[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1]],
            ..Default::default()
        }
    }

    #[test]
    fn inline_polygons_and_overlaps() {
        let map = RegionMap::new(
            &[
                square("A", 0.0, 0.0, 10.0, 10.0),
                square("B", 5.0, 5.0, 20.0, 20.0),
            ],
            None,
        )
        .unwrap();
        assert_eq!(map.regions_at(1.0, 1.0), vec!["A"]);
        assert_eq!(map.regions_at(7.0, 7.0), vec!["A", "B"]);
        assert_eq!(map.regions_at(15.0, 15.0), vec!["B"]);
        assert!(map.regions_at(-1.0, 1.0).is_empty());
        assert!(map.regions_at(f64::NAN, 1.0).is_empty());
    }

    #[test]
    fn geojson_holes_and_countries() {
        let dir = tempfile::tempdir().unwrap();
        // A country with a hole (an enclave) and another country next to it.
        let countries = serde_json::json!({
            "type": "FeatureCollection",
            "features": [
                {"type": "Feature", "properties": {"ISO_A2": "AA"}, "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[0,0],[10,0],[10,10],[0,10],[0,0]], [[4,4],[6,4],[6,6],[4,6],[4,4]]]}},
                {"type": "Feature", "properties": {"iso_a2": "BB"}, "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [[[[10,0],[20,0],[20,10],[10,10],[10,0]]], [[[4.5,4.5],[5.5,4.5],[5.5,5.5],[4.5,5.5],[4.5,4.5]]]]}}
            ]
        });
        let path = dir.path().join("countries.geojson");
        std::fs::write(&path, countries.to_string()).unwrap();
        let map = RegionMap::new(
            &[
                RegionConfig {
                    name: "AA-only".into(),
                    countries: vec!["aa".into()],
                    ..Default::default()
                },
                RegionConfig {
                    name: "union".into(),
                    countries: vec!["AA".into(), "BB".into()],
                    ..Default::default()
                },
            ],
            Some(&path),
        )
        .unwrap();
        // (lat, lon)
        assert_eq!(map.regions_at(2.0, 2.0), vec!["AA-only", "union"]);
        assert_eq!(
            map.regions_at(4.2, 4.2),
            Vec::<String>::new(),
            "in the hole"
        );
        assert_eq!(map.regions_at(5.0, 5.0), vec!["union"], "the enclave is BB");
        assert_eq!(map.regions_at(5.0, 15.0), vec!["union"]);
        // Unknown country and missing boundaries are configuration errors.
        assert!(RegionMap::new(
            &[RegionConfig {
                name: "X".into(),
                countries: vec!["ZZ".into()],
                ..Default::default()
            }],
            Some(&path)
        )
        .is_err());
        assert!(RegionMap::new(
            &[RegionConfig {
                name: "X".into(),
                countries: vec!["AA".into()],
                ..Default::default()
            }],
            None
        )
        .is_err());
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(RegionMap::new(&[RegionConfig::default()], None).is_err());
        assert!(RegionMap::new(
            &[
                square("A", 0.0, 0.0, 1.0, 1.0),
                square("A", 0.0, 0.0, 1.0, 1.0)
            ],
            None
        )
        .is_err());
        let mut two = square("A", 0.0, 0.0, 1.0, 1.0);
        two.polygon.truncate(2);
        assert!(RegionMap::new(&[two], None).is_err());
    }

    // A point exactly on a boundary belongs to the polygon just east of it (just north, on an
    // east-west edge): the half-open rule of the hand-written crossing test, kept with geo.
    #[test]
    fn a_point_on_a_border_is_in_the_region_east_or_north_of_it() {
        let map = RegionMap::new(
            &[
                square("A", 0.0, 0.0, 10.0, 10.0),
                square("B", 10.0, 0.0, 20.0, 10.0),
                square("C", 0.0, 10.0, 10.0, 20.0),
            ],
            None,
        )
        .unwrap();
        // (lat, lon)
        assert_eq!(map.regions_at(5.0, 10.0), vec!["B"], "A|B border");
        assert_eq!(map.regions_at(10.0, 5.0), vec!["C"], "A/C border");
        assert_eq!(map.regions_at(5.0, 0.0), vec!["A"], "A's west edge");
        assert_eq!(map.regions_at(0.0, 5.0), vec!["A"], "A's south edge");
        assert_eq!(
            map.regions_at(5.0, 20.0),
            Vec::<String>::new(),
            "B's east edge"
        );
        assert_eq!(map.regions_at(0.0, 0.0), vec!["A"], "A's south-west corner");
        assert_eq!(
            map.regions_at(0.0, 10.0),
            vec!["B"],
            "A's south-east corner"
        );
        // North-east of the corner that A, B and C share there is no region.
        assert_eq!(map.regions_at(10.0, 10.0), Vec::<String>::new());
    }

    #[test]
    fn a_point_on_a_hole_or_a_slanted_edge_follows_the_same_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.geojson");
        let file = serde_json::json!({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"name": "ring"}, "geometry": {"type": "Polygon",
             "coordinates": [[[0,0],[10,0],[10,10],[0,10],[0,0]], [[4,4],[6,4],[6,6],[4,6],[4,4]]]}}
        ]});
        std::fs::write(&path, file.to_string()).unwrap();
        let ring = RegionConfig {
            name: "ring".into(),
            geojson: Some(path),
            ..Default::default()
        };
        // Two triangles sharing the diagonal from (0, 0) to (10, 10).
        let lower = RegionConfig {
            name: "lower".into(),
            polygon: vec![[20.0, 0.0], [30.0, 0.0], [30.0, 10.0]],
            ..Default::default()
        };
        let upper = RegionConfig {
            name: "upper".into(),
            polygon: vec![[20.0, 0.0], [30.0, 10.0], [20.0, 10.0]],
            ..Default::default()
        };
        let map = RegionMap::new(&[ring, lower, upper], None).unwrap();
        let none = Vec::<String>::new();
        // (lat, lon): the hole's west and south edges are the hole's, its east and north edges
        // the polygon's.
        assert_eq!(map.regions_at(5.0, 4.0), none, "hole's west edge");
        assert_eq!(map.regions_at(4.0, 5.0), none, "hole's south edge");
        assert_eq!(map.regions_at(5.0, 6.0), vec!["ring"], "hole's east edge");
        assert_eq!(map.regions_at(6.0, 5.0), vec!["ring"], "hole's north edge");
        assert_eq!(map.regions_at(5.0, 25.0), vec!["lower"], "on the diagonal");
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn from_file(path: &Path) -> RegionConfig {
        RegionConfig {
            name: "R".into(),
            geojson: Some(path.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn geojson_file_with_a_holed_polygon_and_a_multipolygon() {
        let dir = tempfile::tempdir().unwrap();
        // Feature 0: a square with a square hole. Feature 1: two squares east of it, the second
        // with a hole of its own.
        let file = serde_json::json!({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
                [[0,0],[10,0],[10,10],[0,10],[0,0]], [[2,2],[8,2],[8,8],[2,8],[2,2]]]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "MultiPolygon", "coordinates": [
                [[[20,0],[30,0],[30,10],[20,10],[20,0]]],
                [[[40,0],[50,0],[50,10],[40,10],[40,0]], [[44,4],[46,4],[46,6],[44,6],[44,4]]]]}}
        ]});
        let path = write(&dir, "r.geojson", &file.to_string());
        let map = RegionMap::new(&[from_file(&path)], None).unwrap();
        let none = Vec::<String>::new();
        // (lat, lon)
        assert_eq!(
            map.regions_at(1.0, 1.0),
            vec!["R"],
            "the holed polygon's ring"
        );
        assert_eq!(map.regions_at(5.0, 5.0), none, "its hole");
        assert_eq!(
            map.regions_at(5.0, 25.0),
            vec!["R"],
            "the first of the MultiPolygon"
        );
        assert_eq!(map.regions_at(5.0, 15.0), none, "between the polygons");
        assert_eq!(
            map.regions_at(1.0, 41.0),
            vec!["R"],
            "the second of the MultiPolygon"
        );
        assert_eq!(map.regions_at(5.0, 45.0), none, "the second's hole");
        assert_eq!(map.regions_at(5.0, 55.0), none, "east of everything");
    }

    #[test]
    fn a_malformed_file_names_the_file_and_the_feature() {
        let dir = tempfile::tempdir().unwrap();
        let good = r#"{"type": "Feature", "properties": {"name": "ok"}, "geometry":
            {"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,0]]]}}"#;
        let collection =
            |bad: &str| format!(r#"{{"type": "FeatureCollection", "features": [{good}, {bad}]}}"#);
        let cases = [
            // (file text, what the message must say besides the file's path)
            ("{\"type\": \"Polygon\",", vec!["not JSON", "line 1"]),
            (
                "{\"type\": \"Polygon\", \"coordinates\": \"x\"}",
                vec!["not GeoJSON", "coordinate"],
            ),
            (
                &collection(
                    r#"{"type": "Feature", "properties": {"ISO_A2": "FR"}, "geometry":
                        {"type": "Polygon", "coordinates": [[[0,0],["a",0],[1,1],[0,0]]]}}"#,
                ),
                vec![
                    "not GeoJSON: features[1] (ISO_A2 \"FR\")",
                    "expected f64",
                    "line 3",
                ],
            ),
            (
                // geojson 1.0 parses a one-number position; its geo-types conversion would panic.
                &collection(
                    r#"{"type": "Feature", "properties": {"name": "short"}, "geometry":
                        {"type": "Polygon", "coordinates": [[[0,0],[1],[1,1],[0,0]]]}}"#,
                ),
                vec![
                    "features[1] (name \"short\")",
                    "ring 0: a position is not [lon, lat]",
                ],
            ),
            (
                &collection(
                    r#"{"type": "Feature", "properties": {}, "geometry":
                        {"type": "MultiPolygon", "coordinates": [[[[0,0],[1,0],[1,1]]], [[[0,0],[1,1]]]]}}"#,
                ),
                vec![
                    "features[1]",
                    "polygon 1: ring 0: a ring needs at least 3 positions",
                ],
            ),
            (
                &collection(
                    r#"{"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [0,0]}}"#,
                ),
                vec!["features[1]", "unsupported GeoJSON type \"Point\""],
            ),
            (
                &collection(r#"{"type": "Feature", "properties": {}, "geometry": null}"#),
                vec!["features[1]", "has no geometry"],
            ),
        ];
        for (i, (text, says)) in cases.iter().enumerate() {
            let path = write(&dir, &format!("bad-{i}.geojson"), text);
            let err = RegionMap::new(&[from_file(&path)], None)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{i}: {err}");
            for s in says {
                assert!(err.contains(s), "{i}: {err:?} does not say {s:?}");
            }
        }
        // A missing file, and a bad country boundaries file, name the file too.
        let missing = dir.path().join("missing.geojson");
        let err = RegionMap::new(&[from_file(&missing)], None).unwrap_err();
        assert!(err.to_string().contains("missing.geojson"), "{err}");
        let countries = write(
            &dir,
            "countries.geojson",
            &collection(r#"{"type": "Feature", "properties": {"ISO_A2": "FR"}, "geometry": null}"#),
        );
        let fr = RegionConfig {
            name: "FR".into(),
            countries: vec!["FR".into()],
            ..Default::default()
        };
        let err = RegionMap::new(&[fr], Some(&countries))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("countries.geojson") && err.contains("features[1] (ISO_A2 \"FR\")"),
            "{err}"
        );
    }
}
