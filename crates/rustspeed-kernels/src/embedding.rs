//! Token (+ position) embedding lookup, and its backward: a scatter-add into gradient rows.

use rayon::prelude::*;

use crate::dtype::Float;

/// Rows are gathered/scattered in parallel above this many elements.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmbeddingError {
    #[error("{table} id {id} at row {row} is out of range: the table has {size} rows")]
    IdOutOfRange {
        table: &'static str,
        row: usize,
        id: u32,
        size: usize,
    },
}

fn check_ids(table: &'static str, ids: &[u32], size: usize) -> Result<(), EmbeddingError> {
    match ids.iter().position(|&id| id as usize >= size) {
        Some(row) => Err(EmbeddingError::IdOutOfRange {
            table,
            row,
            id: ids[row],
            size,
        }),
        None => Ok(()),
    }
}

/// `out[r] = wte[tokens[r]] (+ wpe[positions[r]])`, summed in f32 and rounded once.
///
/// `wte` is `[vocab, c]`; `position` is `Some((wpe, positions))` for GPT-2's learned absolute
/// positions (`wpe` is `[max_positions, c]`, one position id per row) and `None` for models
/// whose positions enter elsewhere (RoPE).
pub fn embedding_forward<T: Float>(
    out: &mut [T],
    tokens: &[u32],
    wte: &[T],
    position: Option<(&[T], &[u32])>,
    c: usize,
) -> Result<(), EmbeddingError> {
    assert!(
        c > 0,
        "embedding_forward: the embedding width c must be positive"
    );
    let n = tokens.len();
    assert_eq!(
        out.len(),
        n * c,
        "embedding_forward: out has {} elements, expected rows*c = {n}*{c}",
        out.len()
    );
    assert_eq!(
        wte.len() % c,
        0,
        "embedding_forward: wte length {} is not a multiple of c = {c}",
        wte.len()
    );
    check_ids("token", tokens, wte.len() / c)?;
    if let Some((wpe, positions)) = position {
        assert_eq!(
            positions.len(),
            n,
            "embedding_forward: {} positions for {n} tokens",
            positions.len()
        );
        assert_eq!(
            wpe.len() % c,
            0,
            "embedding_forward: wpe length {} is not a multiple of c = {c}",
            wpe.len()
        );
        check_ids("position", positions, wpe.len() / c)?;
    }
    let row = |(r, o): (usize, &mut [T])| {
        let t = tokens[r] as usize;
        let tok = &wte[t * c..(t + 1) * c];
        match position {
            Some((wpe, positions)) => {
                let p = positions[r] as usize;
                let pos = &wpe[p * c..(p + 1) * c];
                for ((o, a), b) in o.iter_mut().zip(tok).zip(pos) {
                    *o = T::from_f32(a.to_f32() + b.to_f32());
                }
            }
            None => o.copy_from_slice(tok),
        }
    };
    if n * c >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(c).enumerate().for_each(row);
    } else {
        out.chunks_mut(c).enumerate().for_each(row);
    }
    Ok(())
}

/// `dtable[ids[r]] += dout[r]` for every row `r`, accumulating in f32.
///
/// Deterministic for any thread count: rows are grouped by id, each gradient row is owned by one
/// task, and within a group rows are added in increasing order. Use it for both `wte`
/// (ids = tokens) and `wpe` (ids = positions).
pub fn embedding_backward<T: Float>(
    dtable: &mut [f32],
    ids: &[u32],
    dout: &[T],
    c: usize,
) -> Result<(), EmbeddingError> {
    assert!(
        c > 0,
        "embedding_backward: the embedding width c must be positive"
    );
    let n = ids.len();
    assert_eq!(
        dout.len(),
        n * c,
        "embedding_backward: dout has {} elements, expected rows*c = {n}*{c}",
        dout.len()
    );
    assert_eq!(
        dtable.len() % c,
        0,
        "embedding_backward: table length {} is not a multiple of c = {c}",
        dtable.len()
    );
    check_ids("embedding", ids, dtable.len() / c)?;

    // Rows sorted by id; the stable sort keeps each id's rows in increasing order.
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&r| ids[r as usize]);
    let mut groups: Vec<(&mut [f32], &[u32])> = Vec::new();
    let mut rest = &mut dtable[..];
    let mut consumed = 0usize;
    let mut start = 0usize;
    while start < n {
        let id = ids[order[start] as usize] as usize;
        let mut end = start + 1;
        while end < n && ids[order[end] as usize] as usize == id {
            end += 1;
        }
        // Split off this id's gradient row: ids are visited in increasing order.
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((id - consumed) * c);
        let (row, tail) = tail.split_at_mut(c);
        rest = tail;
        consumed = id + 1;
        groups.push((row, &order[start..end]));
        start = end;
    }
    let add = |(row, rows): (&mut [f32], &[u32])| {
        for &r in rows {
            let src = &dout[r as usize * c..(r as usize + 1) * c];
            for (g, d) in row.iter_mut().zip(src) {
                *g += d.to_f32();
            }
        }
    };
    if n * c >= PARALLEL_MIN_ELEMS {
        groups.into_par_iter().for_each(add);
    } else {
        groups.into_iter().for_each(add);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use half::bf16;

    #[test]
    fn forward_matches_naive_with_and_without_positions() {
        let mut rng = Rng::new(10);
        let (v, p, c) = (11, 5, 6);
        let wte = rng.vec(v * c, 1.0);
        let wpe = rng.vec(p * c, 1.0);
        let tokens: Vec<u32> = (0..8).map(|_| rng.below(v) as u32).collect();
        let positions: Vec<u32> = (0..8).map(|r| (r % 4) as u32).collect();
        let mut out = vec![0f32; 8 * c];
        embedding_forward(&mut out, &tokens, &wte, Some((&wpe, &positions)), c).unwrap();
        let want: Vec<f64> = (0..8 * c)
            .map(|i| {
                let (r, j) = (i / c, i % c);
                wte[tokens[r] as usize * c + j] as f64 + wpe[positions[r] as usize * c + j] as f64
            })
            .collect();
        assert_close("wte+wpe", &out, &want, 1e-7);
        embedding_forward(&mut out, &tokens, &wte, None, c).unwrap();
        let want: Vec<f64> = (0..8 * c)
            .map(|i| wte[tokens[i / c] as usize * c + i % c] as f64)
            .collect();
        assert_close("wte only", &out, &want, 0.0);
    }

    #[test]
    fn out_of_range_ids_are_errors_naming_row_and_id() {
        let wte = vec![0f32; 4 * 2];
        let mut out = vec![0f32; 2 * 2];
        let err = embedding_forward(&mut out, &[1, 4], &wte, None, 2).unwrap_err();
        assert_eq!(
            err,
            EmbeddingError::IdOutOfRange {
                table: "token",
                row: 1,
                id: 4,
                size: 4
            }
        );
        assert!(err.to_string().contains("id 4 at row 1"), "{err}");
        let wpe = vec![0f32; 2 * 2];
        let err = embedding_forward(&mut out, &[0, 1], &wte, Some((&wpe, &[0, 2])), 2).unwrap_err();
        assert_eq!(
            err,
            EmbeddingError::IdOutOfRange {
                table: "position",
                row: 1,
                id: 2,
                size: 2
            }
        );
        let mut d = vec![0f32; 4 * 2];
        assert!(embedding_backward(&mut d, &[9, 0], &out, 2).is_err());
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let (v, c) = (7, 3);
        // Repeated ids exercise the grouped accumulation.
        let tokens: Vec<u32> = vec![3, 0, 3, 6, 3, 0];
        let mut wte = rng.vec(v * c, 1.0);
        let probe = rng.vec(tokens.len() * c, 1.0);
        let loss = |w: &[f32]| -> f64 {
            let mut out = vec![0f32; tokens.len() * c];
            embedding_forward(&mut out, &tokens, w, None, c).unwrap();
            out.iter()
                .zip(&probe)
                .map(|(o, p)| *o as f64 * *p as f64)
                .sum()
        };
        let init = rng.vec(v * c, 1.0);
        let mut dwte = init.clone();
        embedding_backward(&mut dwte, &tokens, &probe, c).unwrap();
        let delta: Vec<f32> = dwte.iter().zip(&init).map(|(a, b)| a - b).collect();
        let num = numeric_grad(&mut wte, 1e-2, loss);
        assert_grad_close("dwte", &delta, &num, 1e-3);
    }

    #[test]
    fn parallel_backward_is_deterministic_and_matches_serial_sum() {
        let mut rng = Rng::new(12);
        let (v, c, n) = (50, 64, 2048);
        let ids: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
        let dout = rng.vec(n * c, 1.0);
        let mut want = vec![0f32; v * c];
        for r in 0..n {
            for j in 0..c {
                want[ids[r] as usize * c + j] += dout[r * c + j];
            }
        }
        let mut got = vec![0f32; v * c];
        embedding_backward(&mut got, &ids, &dout, c).unwrap();
        // Same per-row order as the serial loop, so bit-identical.
        assert_eq!(got, want);
    }

    #[test]
    fn bf16_storage_matches_f32() {
        let mut rng = Rng::new(13);
        let (v, p, c) = (9, 4, 8);
        let wte = rng.vec(v * c, 1.0);
        let wpe = rng.vec(p * c, 1.0);
        let tokens: Vec<u32> = vec![1, 8, 0, 1];
        let pos: Vec<u32> = vec![0, 1, 2, 3];
        let b = |v: &[f32]| v.iter().map(|x| bf16::from_f32(*x)).collect::<Vec<_>>();
        let (wte16, wpe16) = (b(&wte), b(&wpe));
        let mut out16 = vec![bf16::from_f32(0.0); 4 * c];
        embedding_forward(&mut out16, &tokens, &wte16, Some((&wpe16, &pos)), c).unwrap();
        let f = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let mut out = vec![0f32; 4 * c];
        embedding_forward(&mut out, &tokens, &f(&wte16), Some((&f(&wpe16), &pos)), c).unwrap();
        // One bf16 rounding of the sum: relative 2^-8.
        assert_close(
            "bf16 out",
            &f(&out16),
            &out.iter().map(|x| *x as f64).collect::<Vec<_>>(),
            4e-3,
        );
    }
}
