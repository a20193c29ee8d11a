//! Tenants: who an API key acts for, where that tenant's data may be processed, and how fast
//! it may send work.
//!
//! Residency: a tenant's regions bound every request it makes. A request without its own
//! `tokenfleet.residency` gets the tenant's; one with its own must stay inside the tenant's
//! (otherwise 400), so a key can narrow its residency but never widen it.
//!
//! Rate limits, OpenAI-style: requests per minute and tokens per minute, each a token bucket
//! refilled continuously. Tokens are counted at admission as prompt characters / 4 plus
//! `max_tokens` (what OpenAI's limiter counts too: the budget a request may use, not what it
//! ends up using). A quota, `tokens_per_day`, counts the same way per UTC day. A refused
//! request gets a 429 in OpenAI's shape (`insufficient_quota` for the daily quota) with
//! `Retry-After`.
//!
//! The Batch API is bound the same way: every line's request gets the tenant's residency
//! ([`Tenants::bind`], lines outside it become error entries) and counts against the daily
//! quota ([`Tenants::charge_quota`], lines past it become `insufficient_quota` entries). The
//! per-minute limits smooth interactive traffic and do not apply to batch lines, which the
//! fleet paces itself within their completion window (as OpenAI keeps batch limits apart).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::policy::TenantConfig;
use crate::domain::error::RequestError;
use crate::domain::request::ValidRequest;

/// A continuously refilled bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Self {
            level: capacity,
            at: now,
        }
    }

    /// Refills at `capacity` per minute, then takes `n` if there is enough; otherwise the
    /// wait until there would be.
    fn take(&mut self, n: f64, capacity: f64, now: Instant) -> Result<(), Duration> {
        let rate = capacity / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * rate).min(capacity);
        self.at = now;
        if n <= self.level {
            self.level -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((n - self.level) / rate).max(0.001),
            ))
        }
    }

    fn give_back(&mut self, n: f64, capacity: f64) {
        self.level = (self.level + n).min(capacity);
    }
}

#[derive(Debug, Default)]
struct Usage {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// (UTC day number, tokens admitted that day).
    today: (u64, u64),
}

/// The configured tenants and their rate-limit state.
#[derive(Debug, Default)]
pub struct Tenants {
    configs: HashMap<String, TenantConfig>,
    usage: Mutex<HashMap<String, Usage>>,
}

impl Tenants {
    pub fn new(configs: &[TenantConfig]) -> Self {
        Self {
            configs: configs
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            usage: Mutex::new(HashMap::new()),
        }
    }

    /// Applies the tenant's residency to a validated request (400 when the request asks for
    /// regions outside the tenant's).
    pub fn bind_residency(
        &self,
        tenant: &str,
        request: &mut ValidRequest,
    ) -> Result<(), RequestError> {
        let Some(allowed) = self
            .configs
            .get(tenant)
            .map(|c| &c.residency)
            .filter(|r| !r.is_empty())
        else {
            return Ok(());
        };
        match &mut request.residency {
            None => request.residency = Some(allowed.clone()),
            Some(asked) => {
                if let Some(outside) = asked.iter().find(|r| !allowed.contains(r)) {
                    return Err(RequestError::invalid(
                        format!(
                            "tokenfleet.residency {outside:?} is outside this API key's regions ({})",
                            allowed.join(", ")
                        ),
                        Some("tokenfleet.residency"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// [`Tenants::bind_residency`], then refuses a request naming a region `regions` does not
    /// define (400): such a request could never be placed and would wait for nothing.
    pub fn bind(
        &self,
        tenant: &str,
        request: &mut ValidRequest,
        regions: &crate::policy::regions::RegionMap,
    ) -> Result<(), RequestError> {
        self.bind_residency(tenant, request)?;
        match &request.residency {
            Some(asked) => known(asked, regions, "tokenfleet.residency"),
            None => Ok(()),
        }
    }

    /// Checks regions a client asks for outside a request (a batch's `metadata.residency`):
    /// each must exist and lie inside the tenant's residency (400 naming `param` otherwise).
    pub fn check_residency(
        &self,
        tenant: &str,
        asked: &[String],
        regions: &crate::policy::regions::RegionMap,
        param: &str,
    ) -> Result<(), RequestError> {
        known(asked, regions, param)?;
        let allowed = self.configs.get(tenant).map(|c| &c.residency);
        if let Some(outside) = allowed
            .filter(|a| !a.is_empty())
            .and_then(|a| asked.iter().find(|r| !a.contains(r)))
        {
            return Err(RequestError::invalid(
                format!(
                    "{param} {outside:?} is outside this API key's regions ({})",
                    allowed.map(|a| a.join(", ")).unwrap_or_default()
                ),
                Some(param),
            ));
        }
        Ok(())
    }

    /// Counts a request against the tenant's daily quota only (a batch line; see the module
    /// doc), or refuses it with the quota's 429.
    pub fn charge_quota(
        &self,
        tenant: &str,
        request: &ValidRequest,
        unix_s: u64,
    ) -> Result<(), RequestError> {
        let Some(cfg) = self.configs.get(tenant).filter(|c| c.tokens_per_day > 0) else {
            return Ok(());
        };
        let tokens = budget(request);
        let mut usage = self.usage.lock().expect("tenant usage lock");
        let u = usage.entry(tenant.to_string()).or_default();
        check_quota(tenant, cfg, u, tokens, unix_s)?;
        u.today.1 += tokens as u64;
        Ok(())
    }

    /// Counts a request against the tenant's limits, or refuses it with a 429.
    pub fn admit(
        &self,
        tenant: &str,
        request: &ValidRequest,
        now: Instant,
    ) -> Result<(), RequestError> {
        self.admit_at(tenant, request, now, crate::clock::unix_s())
    }

    /// [`Tenants::admit`] at a given monotonic instant and wall-clock time (UTC seconds).
    pub fn admit_at(
        &self,
        tenant: &str,
        request: &ValidRequest,
        now: Instant,
        unix_s: u64,
    ) -> Result<(), RequestError> {
        let Some(cfg) = self.configs.get(tenant) else {
            return Ok(());
        };
        if cfg.requests_per_minute == 0 && cfg.tokens_per_minute == 0 && cfg.tokens_per_day == 0 {
            return Ok(());
        }
        let tokens = budget(request);
        let mut usage = self.usage.lock().expect("tenant usage lock");
        let u = usage.entry(tenant.to_string()).or_default();
        let rpm = f64::from(cfg.requests_per_minute);
        let tpm = f64::from(cfg.tokens_per_minute);
        check_quota(tenant, cfg, u, tokens, unix_s)?;
        if rpm > 0.0 {
            let bucket = u.requests.get_or_insert_with(|| Bucket::full(rpm, now));
            if let Err(wait) = bucket.take(1.0, rpm, now) {
                return Err(RequestError::rate_limited(
                    format!(
                        "Rate limit reached for tenant {tenant} on requests per min (RPM): Limit {}. Please try again in {:.1}s.",
                        cfg.requests_per_minute,
                        wait.as_secs_f64()
                    ),
                    "requests",
                    wait,
                ));
            }
        }
        if tpm > 0.0 {
            if tokens > tpm {
                return Err(RequestError::rate_limited(
                    format!(
                        "Request too large for tenant {tenant} on tokens per min (TPM): Limit {}, Requested {tokens}. Lower max_tokens or the prompt.",
                        cfg.tokens_per_minute
                    ),
                    "tokens",
                    Duration::ZERO,
                ));
            }
            let bucket = u.tokens.get_or_insert_with(|| Bucket::full(tpm, now));
            if let Err(wait) = bucket.take(tokens, tpm, now) {
                // The request was not admitted: it does not use up a request either.
                if let Some(r) = u.requests.as_mut() {
                    r.give_back(1.0, rpm);
                }
                return Err(RequestError::rate_limited(
                    format!(
                        "Rate limit reached for tenant {tenant} on tokens per min (TPM): Limit {}, Requested {tokens}. Please try again in {:.1}s.",
                        cfg.tokens_per_minute,
                        wait.as_secs_f64()
                    ),
                    "tokens",
                    wait,
                ));
            }
        }
        u.today.1 += tokens as u64;
        Ok(())
    }
}

/// Refuses (400, naming `param`) the first of `asked` that `regions` does not define.
fn known(
    asked: &[String],
    regions: &crate::policy::regions::RegionMap,
    param: &str,
) -> Result<(), RequestError> {
    match asked.iter().find(|r| !regions.knows(r)) {
        Some(unknown) => Err(RequestError::invalid(
            format!("{param} names {unknown:?}, which is not a region of this fleet"),
            Some(param),
        )),
        None => Ok(()),
    }
}

/// The tokens a request may use: prompt characters / 4 plus `max_tokens`.
fn budget(request: &ValidRequest) -> f64 {
    request.prompt_chars().div_ceil(4) as f64 + f64::from(request.max_tokens)
}

/// Rolls the tenant's day over at 00:00 UTC, then refuses `tokens` past its daily quota.
fn check_quota(
    tenant: &str,
    cfg: &TenantConfig,
    u: &mut Usage,
    tokens: f64,
    unix_s: u64,
) -> Result<(), RequestError> {
    let day = unix_s / 86_400;
    if u.today.0 != day {
        u.today = (day, 0);
    }
    if cfg.tokens_per_day > 0 && u.today.1 + tokens as u64 > cfg.tokens_per_day {
        let wait = Duration::from_secs((day + 1) * 86_400 - unix_s);
        let mut e = RequestError::rate_limited(
            format!(
                "You exceeded tenant {tenant}'s daily quota of {} tokens ({} used, {tokens} requested). It resets at 00:00 UTC.",
                cfg.tokens_per_day, u.today.1
            ),
            "insufficient_quota",
            wait,
        );
        e.code = Some("insufficient_quota");
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::ErrorKind;

    fn request(max_tokens: u32, residency: Option<Vec<&str>>) -> ValidRequest {
        let mut r = ValidRequest::sample("abcdefgh", max_tokens);
        r.residency = residency.map(|r| r.into_iter().map(String::from).collect());
        r
    }

    fn tenants() -> Tenants {
        Tenants::new(&[TenantConfig {
            name: "eu-bank".into(),
            residency: vec!["EU".into(), "DE".into()],
            requests_per_minute: 2,
            tokens_per_minute: 100,
            ..Default::default()
        }])
    }

    #[test]
    fn residency_is_inherited_and_can_only_narrow() {
        let t = tenants();
        let mut r = request(8, None);
        t.bind_residency("eu-bank", &mut r).unwrap();
        assert_eq!(r.residency, Some(vec!["EU".into(), "DE".into()]));
        let mut narrower = request(8, Some(vec!["DE"]));
        t.bind_residency("eu-bank", &mut narrower).unwrap();
        assert_eq!(narrower.residency, Some(vec!["DE".into()]));
        let mut wider = request(8, Some(vec!["DE", "US"]));
        let err = t.bind_residency("eu-bank", &mut wider).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        // Unlisted tenants are unbound.
        let mut free = request(8, None);
        t.bind_residency("other", &mut free).unwrap();
        assert_eq!(free.residency, None);
    }

    #[test]
    fn requests_per_minute_refill_over_time() {
        let t = tenants();
        let t0 = Instant::now();
        let r = request(10, None);
        t.admit("eu-bank", &r, t0).unwrap();
        t.admit("eu-bank", &r, t0).unwrap();
        let err = t.admit("eu-bank", &r, t0).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooManyRequests);
        assert_eq!(err.code, Some("rate_limit_exceeded"));
        assert_eq!(err.error_type, "requests");
        // 2 per minute: one more after 30 s.
        t.admit("eu-bank", &r, t0 + Duration::from_secs(31))
            .unwrap();
        // Other tenants are not affected.
        for _ in 0..10 {
            t.admit("other", &r, t0).unwrap();
        }
    }

    #[test]
    fn the_daily_quota_counts_admitted_tokens_and_resets_at_midnight_utc() {
        let t = Tenants::new(&[TenantConfig {
            name: "small".into(),
            tokens_per_day: 100,
            ..Default::default()
        }]);
        let t0 = Instant::now();
        let noon = 20_000 * 86_400 + 12 * 3600;
        // 2 prompt tokens + 40 each.
        t.admit_at("small", &request(40, None), t0, noon).unwrap();
        t.admit_at("small", &request(40, None), t0, noon).unwrap();
        let err = t
            .admit_at("small", &request(40, None), t0, noon + 60)
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooManyRequests);
        assert_eq!(err.code, Some("insufficient_quota"));
        assert_eq!(err.retry_after, Some(Duration::from_secs(12 * 3600 - 60)));
        // A refused request used nothing: a smaller one still fits.
        t.admit_at("small", &request(10, None), t0, noon + 61)
            .unwrap();
        // The next UTC day starts from zero.
        t.admit_at("small", &request(40, None), t0, noon + 12 * 3600)
            .unwrap();
    }

    #[test]
    fn tokens_per_minute_count_prompt_and_max_tokens() {
        let t = tenants();
        let t0 = Instant::now();
        // 8 prompt chars -> 2 tokens, + 60 = 62 of 100.
        t.admit("eu-bank", &request(60, None), t0).unwrap();
        let err = t.admit("eu-bank", &request(60, None), t0).unwrap_err();
        assert_eq!(err.error_type, "tokens");
        // The refused request did not use up a request slot: a small one still fits.
        t.admit("eu-bank", &request(30, None), t0).unwrap();
        // Larger than the whole limit: refused outright.
        let err = t
            .admit(
                "eu-bank",
                &request(500, None),
                t0 + Duration::from_secs(600),
            )
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::TooManyRequests);
    }
}
