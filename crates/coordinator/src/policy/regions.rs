//! Data-residency regions: which named regions a vehicle is in, from its reported position.
//!
//! A region is a set of polygons (GeoJSON `Polygon` / `MultiPolygon`, holes respected), given
//! inline, from a GeoJSON file, or as ISO 3166-1 alpha-2 country codes resolved through a
//! country-boundaries GeoJSON file the operator supplies (e.g. Natural Earth admin-0, public
//! domain; features carry `ISO_A2`, `iso_a2` or `ISO3166-1-Alpha-2`). A vehicle with no fresh
//! position is in no region, so it never receives a residency-bound request.
//!
//! The coordinator recomputes a vehicle's regions on every `State`; a job whose residency no
//! longer holds (the vehicle crossed a border) is taken back and continues elsewhere.

use std::path::Path;

use serde_json::Value;

use crate::config::policy::RegionConfig;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region {region:?}: {message}")]
    Invalid { region: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// A polygon: outer ring and holes, `[lon, lat]` vertices.
#[derive(Debug, Clone, PartialEq)]
struct Polygon {
    outer: Vec<[f64; 2]>,
    holes: Vec<Vec<[f64; 2]>>,
    /// Bounding box (min lon, min lat, max lon, max lat) for a cheap reject.
    bbox: [f64; 4],
}

impl Polygon {
    fn new(outer: Vec<[f64; 2]>, holes: Vec<Vec<[f64; 2]>>) -> Self {
        let mut bbox = [
            f64::INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
        ];
        for p in &outer {
            bbox[0] = bbox[0].min(p[0]);
            bbox[1] = bbox[1].min(p[1]);
            bbox[2] = bbox[2].max(p[0]);
            bbox[3] = bbox[3].max(p[1]);
        }
        Self { outer, holes, bbox }
    }

    fn contains(&self, lon: f64, lat: f64) -> bool {
        let [x0, y0, x1, y1] = self.bbox;
        if lon < x0 || lon > x1 || lat < y0 || lat > y1 {
            return false;
        }
        ring_contains(&self.outer, lon, lat)
            && !self.holes.iter().any(|h| ring_contains(h, lon, lat))
    }
}

/// Even-odd ray casting (planar in lon/lat, which is what GeoJSON boundaries mean).
fn ring_contains(ring: &[[f64; 2]], x: f64, y: f64) -> bool {
    let mut inside = false;
    let n = ring.len();
    if n < 3 {
        return false;
    }
    let mut j = n - 1;
    for i in 0..n {
        let [xi, yi] = ring[i];
        let [xj, yj] = ring[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The configured regions, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct RegionMap {
    regions: Vec<(String, Vec<Polygon>)>,
}

impl RegionMap {
    /// Builds the map; `country_boundaries` is needed only when a region lists countries.
    pub fn new(
        configs: &[RegionConfig],
        country_boundaries: Option<&Path>,
    ) -> Result<Self, RegionError> {
        let countries = match country_boundaries {
            Some(path) if configs.iter().any(|c| !c.countries.is_empty()) => {
                Some(read_geojson(path)?)
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
            let mut polygons = Vec::new();
            if !c.polygon.is_empty() {
                if c.polygon.len() < 3 {
                    return Err(invalid(
                        "an inline polygon needs at least 3 vertices".into(),
                    ));
                }
                polygons.push(Polygon::new(c.polygon.clone(), Vec::new()));
            }
            if let Some(path) = &c.geojson {
                collect_polygons(&read_geojson(path)?, &mut polygons, None)
                    .map_err(|m| invalid(format!("{}: {m}", path.display())))?;
            }
            for code in &c.countries {
                let Some(boundaries) = &countries else {
                    return Err(invalid(
                        "lists countries but no country_boundaries GeoJSON is configured".into(),
                    ));
                };
                let before = polygons.len();
                collect_polygons(boundaries, &mut polygons, Some(code))
                    .map_err(|m| invalid(format!("country boundaries: {m}")))?;
                if polygons.len() == before {
                    return Err(invalid(format!(
                        "country {code:?} is not in the country boundaries file"
                    )));
                }
            }
            if polygons.is_empty() {
                return Err(invalid(
                    "needs an inline polygon, a geojson file or countries".into(),
                ));
            }
            regions.push((c.name.clone(), polygons));
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
        self.regions
            .iter()
            .filter(|(_, polys)| polys.iter().any(|p| p.contains(longitude, latitude)))
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

fn read_geojson(path: &Path) -> Result<Value, RegionError> {
    let file = |message: String| RegionError::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| file(format!("not JSON: {e}")))
}

/// Appends the polygons of a GeoJSON value; with `country`, only features whose ISO alpha-2
/// property equals it.
fn collect_polygons(
    v: &Value,
    out: &mut Vec<Polygon>,
    country: Option<&str>,
) -> Result<(), String> {
    match v["type"].as_str() {
        Some("FeatureCollection") => {
            for f in v["features"].as_array().ok_or("features is not an array")? {
                collect_polygons(f, out, country)?;
            }
            Ok(())
        }
        Some("Feature") => {
            if let Some(code) = country {
                let props = &v["properties"];
                let matches = ["ISO_A2", "iso_a2", "ISO3166-1-Alpha-2", "ISO_A2_EH"]
                    .iter()
                    .any(|k| {
                        props[*k]
                            .as_str()
                            .is_some_and(|c| c.eq_ignore_ascii_case(code))
                    });
                if !matches {
                    return Ok(());
                }
            }
            collect_polygons(&v["geometry"], out, None)
        }
        Some("Polygon") if country.is_none() => {
            out.push(polygon(&v["coordinates"])?);
            Ok(())
        }
        Some("MultiPolygon") if country.is_none() => {
            for p in v["coordinates"]
                .as_array()
                .ok_or("MultiPolygon coordinates are not an array")?
            {
                out.push(polygon(p)?);
            }
            Ok(())
        }
        Some("GeometryCollection") if country.is_none() => {
            for g in v["geometries"]
                .as_array()
                .ok_or("geometries is not an array")?
            {
                collect_polygons(g, out, None)?;
            }
            Ok(())
        }
        Some("Polygon" | "MultiPolygon" | "GeometryCollection") => Ok(()),
        Some(other) => Err(format!("unsupported GeoJSON type {other:?}")),
        None => Err("a GeoJSON object needs a type".into()),
    }
}

fn polygon(coords: &Value) -> Result<Polygon, String> {
    let rings = coords
        .as_array()
        .ok_or("Polygon coordinates are not an array")?;
    let mut parsed = Vec::with_capacity(rings.len());
    for ring in rings {
        let pts = ring
            .as_array()
            .ok_or("a ring is not an array")?
            .iter()
            .map(|p| match (p[0].as_f64(), p[1].as_f64()) {
                (Some(lon), Some(lat)) => Ok([lon, lat]),
                _ => Err("a position is not [lon, lat]".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if pts.len() < 3 {
            return Err("a ring needs at least 3 positions".into());
        }
        parsed.push(pts);
    }
    let mut rings = parsed.into_iter();
    let outer = rings.next().ok_or("a Polygon needs an outer ring")?;
    Ok(Polygon::new(outer, rings.collect()))
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
}
