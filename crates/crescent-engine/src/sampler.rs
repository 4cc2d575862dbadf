//! Token and bin selection: greedy argmax (first maximum) and the portable seeded nucleus
//! sampler of the fixtures (SplitMix64, float64 softmax; fixture README item 7).

/// SplitMix64 pseudo-random generator.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the maximum (the first one on ties); NaNs never win.
pub fn argmax(x: &[f32]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, bv)) if v <= bv => {}
            _ => best = Some((i, v)),
        }
    }
    best.map_or(0, |b| b.0)
}

/// Temperature + top-p sampling in float64: `p = softmax(logits / T)`, sorted by probability
/// (ties: lower id first), keep the prefix whose mass before each token is `<= top_p`, draw
/// `u` and pick the first kept token whose cumulative mass exceeds `u · total`.
/// Rows with no finite logit fall back to greedy.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> usize {
    let t = temperature as f64;
    let x: Vec<f64> = logits.iter().map(|&v| v as f64 / t).collect();
    let m = x
        .iter()
        .cloned()
        .filter(|v| !v.is_nan())
        .fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return argmax(logits);
    }
    let mut p: Vec<f64> = x
        .iter()
        .map(|v| if v.is_nan() { 0.0 } else { (v - m).exp() })
        .collect();
    let sum: f64 = p.iter().sum();
    for v in p.iter_mut() {
        *v /= sum;
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| {
        p[b].partial_cmp(&p[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let top_p = top_p as f64;
    let mut kept = Vec::with_capacity(order.len());
    let mut before = 0.0f64;
    for (i, &id) in order.iter().enumerate() {
        if i > 0 && before > top_p {
            break;
        }
        kept.push(id);
        before += p[id];
    }
    let mut cum = Vec::with_capacity(kept.len());
    let mut acc = 0.0f64;
    for &id in &kept {
        acc += p[id];
        cum.push(acc);
    }
    let total = acc;
    let u = rng.next_f64();
    let target = u * total;
    let idx = cum
        .iter()
        .position(|&c| c > target)
        .unwrap_or(kept.len() - 1);
    kept[idx]
}

/// Pick from `logits` with the request's settings: greedy when `temperature <= 0`.
pub fn pick(logits: &[f32], temperature: f32, top_p: f32, rng: &mut SplitMix64) -> usize {
    if temperature <= 0.0 {
        argmax(logits)
    } else {
        sample(logits, temperature, top_p, rng)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // SplitMix64 with seed 0: first outputs (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn argmax_first_on_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]), 2);
    }

    #[test]
    fn top_p_restricts_the_candidates() {
        // p ≈ [0.665, 0.245, 0.09]: top_p 0.5 keeps only the first.
        let logits = [2.0f32, 1.0, 0.0];
        let mut r = SplitMix64::new(7);
        for _ in 0..100 {
            assert_eq!(sample(&logits, 1.0, 0.5, &mut r), 0);
        }
        // top_p 1 reaches every token over many draws.
        let mut seen = [false; 3];
        for _ in 0..2000 {
            seen[sample(&logits, 1.0, 1.0, &mut r)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn masked_logits_are_never_sampled() {
        let logits = [f32::NEG_INFINITY, 0.3, f32::NEG_INFINITY, 0.1];
        let mut r = SplitMix64::new(1);
        for _ in 0..500 {
            let i = sample(&logits, 0.8, 1.0, &mut r);
            assert!(i == 1 || i == 3);
        }
        assert_eq!(sample(&[f32::NEG_INFINITY; 4], 1.0, 1.0, &mut r), 0);
    }
}
