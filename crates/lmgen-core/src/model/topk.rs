//! `torch.topk(x, k, largest=True, sorted=True)` on the CPU, reproduced exactly, ties included.
//!
//! torch (`aten/src/ATen/native/TopKImpl.h`, `topk_impl_loop`) copies a row into a vector of
//! `(value, index)` pairs and runs libstdc++'s selection algorithms on it with the comparator
//! `(isnan(x) && !isnan(y)) || x > y`: `std::partial_sort(begin, begin + k, end)` when
//! `k * 64 <= n`, else `std::nth_element(begin, begin + k - 1, end)` followed by
//! `std::sort(begin, begin + k - 1)`. Which of several exactly equal values come out, and in
//! which order, is decided by those algorithms (`topk(zeros(8), 2)` gives indices `[6, 5]`),
//! so this module transcribes them step for step: introselect with median-of-three pivots and
//! an unguarded partition, introsort (threshold 16) with a final insertion sort, and the heap
//! select / heap sort of `partial_sort`.
//!
//! Checked against torch on tie-heavy rows by `tests/fixtures/topk/torch_topk_ties.json`.

type Elem = (f32, usize);

/// libstdc++ `std::__lg`: floor(log2(n)) for n > 0.
fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// The comparator torch passes for `largest=True`: NaN first, then larger values.
#[inline]
fn comp(x: &Elem, y: &Elem) -> bool {
    (x.0.is_nan() && !y.0.is_nan()) || x.0 > y.0
}

fn move_median_to_first(q: &mut [Elem], result: usize, a: usize, b: usize, c: usize) {
    let pick = if comp(&q[a], &q[b]) {
        if comp(&q[b], &q[c]) {
            b
        } else if comp(&q[a], &q[c]) {
            c
        } else {
            a
        }
    } else if comp(&q[a], &q[c]) {
        a
    } else if comp(&q[b], &q[c]) {
        c
    } else {
        b
    };
    q.swap(result, pick);
}

fn unguarded_partition(q: &mut [Elem], mut first: usize, mut last: usize, pivot: usize) -> usize {
    loop {
        while comp(&q[first], &q[pivot]) {
            first += 1;
        }
        last -= 1;
        while comp(&q[pivot], &q[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        q.swap(first, last);
        first += 1;
    }
}

fn unguarded_partition_pivot(q: &mut [Elem], first: usize, last: usize) -> usize {
    let mid = first + (last - first) / 2;
    move_median_to_first(q, first, first + 1, mid, last - 1);
    unguarded_partition(q, first + 1, last, first)
}

fn unguarded_linear_insert(q: &mut [Elem], mut last: usize) {
    let val = q[last];
    let mut next = last - 1;
    while comp(&val, &q[next]) {
        q[last] = q[next];
        last = next;
        next -= 1;
    }
    q[last] = val;
}

fn insertion_sort(q: &mut [Elem], first: usize, last: usize) {
    if first == last {
        return;
    }
    for i in first + 1..last {
        if comp(&q[i], &q[first]) {
            let val = q[i];
            q.copy_within(first..i, first + 1);
            q[first] = val;
        } else {
            unguarded_linear_insert(q, i);
        }
    }
}

/// `std::__adjust_heap` followed by its `std::__push_heap`, on the heap `q[first..first + len]`.
fn adjust_heap(q: &mut [Elem], first: usize, mut hole: usize, len: usize, value: Elem) {
    let top = hole;
    let mut second = hole;
    while len > 0 && second < (len - 1) / 2 {
        second = 2 * (second + 1);
        if comp(&q[first + second], &q[first + second - 1]) {
            second -= 1;
        }
        q[first + hole] = q[first + second];
        hole = second;
    }
    if len.is_multiple_of(2) && len >= 2 && second == (len - 2) / 2 {
        second = 2 * (second + 1);
        q[first + hole] = q[first + second - 1];
        hole = second - 1;
    }
    while hole > top {
        let parent = (hole - 1) / 2;
        if !comp(&q[first + parent], &value) {
            break;
        }
        q[first + hole] = q[first + parent];
        hole = parent;
    }
    q[first + hole] = value;
}

fn make_heap(q: &mut [Elem], first: usize, last: usize) {
    let len = last - first;
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = q[first + parent];
        adjust_heap(q, first, parent, len, v);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn pop_heap(q: &mut [Elem], first: usize, last: usize, result: usize) {
    let value = q[result];
    q[result] = q[first];
    adjust_heap(q, first, 0, last - first, value);
}

fn heap_select(q: &mut [Elem], first: usize, middle: usize, last: usize) {
    make_heap(q, first, middle);
    for i in middle..last {
        if comp(&q[i], &q[first]) {
            pop_heap(q, first, middle, i);
        }
    }
}

fn sort_heap(q: &mut [Elem], first: usize, mut last: usize) {
    while last - first > 1 {
        last -= 1;
        pop_heap(q, first, last, last);
    }
}

/// `std::partial_sort(first, middle, last)`.
fn partial_sort(q: &mut [Elem], first: usize, middle: usize, last: usize) {
    heap_select(q, first, middle, last);
    sort_heap(q, first, middle);
}

/// `std::nth_element(first, nth, last)` (`std::__introselect`).
fn nth_element(q: &mut [Elem], mut first: usize, nth: usize, mut last: usize) {
    if first == last || nth == last {
        return;
    }
    let mut depth = lg(last - first) * 2;
    while last - first > 3 {
        if depth == 0 {
            heap_select(q, first, nth + 1, last);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(q, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(q, first, last);
}

const S_THRESHOLD: usize = 16;

fn introsort_loop(q: &mut [Elem], first: usize, mut last: usize, mut depth: usize) {
    while last - first > S_THRESHOLD {
        if depth == 0 {
            partial_sort(q, first, last, last);
            return;
        }
        depth -= 1;
        let cut = unguarded_partition_pivot(q, first, last);
        introsort_loop(q, cut, last, depth);
        last = cut;
    }
}

/// `std::sort(first, last)`: introsort, then the final insertion sort.
fn sort(q: &mut [Elem], first: usize, last: usize) {
    if first == last {
        return;
    }
    introsort_loop(q, first, last, lg(last - first) * 2);
    if last - first > S_THRESHOLD {
        insertion_sort(q, first, first + S_THRESHOLD);
        for i in first + S_THRESHOLD..last {
            unguarded_linear_insert(q, i);
        }
    } else {
        insertion_sort(q, first, last);
    }
}

/// The indices of `torch.topk(values, k)` (largest, sorted) on the CPU, in torch's order,
/// written to `out`. `k` is clamped to `values.len()`; `scratch` is reused storage.
pub fn topk_into(values: &[f32], k: usize, scratch: &mut Vec<(f32, usize)>, out: &mut Vec<usize>) {
    out.clear();
    let n = values.len();
    let k = k.min(n);
    if k == 0 {
        return;
    }
    scratch.clear();
    scratch.extend(values.iter().copied().zip(0..));
    let q = scratch.as_mut_slice();
    if k * 64 <= n {
        partial_sort(q, 0, k, n);
    } else {
        nth_element(q, 0, k - 1, n);
        sort(q, 0, k - 1);
    }
    out.extend(q[..k].iter().map(|&(_, i)| i));
}

/// [`topk_into`] with fresh storage.
pub fn topk(values: &[f32], k: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(k);
    topk_into(values, k, &mut Vec::new(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_ties_follow_torch_examples() {
        assert_eq!(topk(&[0.0; 8], 2), vec![6, 5]);
        assert_eq!(topk(&[0.0; 64], 8), vec![44, 41, 42, 43, 46, 47, 40, 45]);
        assert_eq!(topk(&[1.0, 3.0, 2.0], 3), vec![1, 2, 0]);
        assert_eq!(topk(&[1.0, f32::NAN, 2.0], 1), vec![1]);
    }

    /// Every case of the fixture (values from a few levels, n in 4..160, k in 1..8, generated
    /// by `scripts/make_topk_fixture.py` with torch's CPU `topk`) comes out identically, both
    /// for `topk` over the values and for [`route`](super::super::decoder::route) over them as
    /// router logits (softmax, then top-k of the probabilities, where logits far below the
    /// maximum underflow to equal probabilities).
    #[test]
    fn topk_and_route_match_torch_on_ties() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/topk/torch_topk_ties.json"
        );
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = cases["cases"].as_array().unwrap();
        assert!(cases.len() >= 400, "{}", cases.len());
        let as_vec = |v: &serde_json::Value| -> Vec<usize> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect()
        };
        let (mut partial, mut underflow, mut picked) = (0, 0, Vec::new());
        for (c, case) in cases.iter().enumerate() {
            let levels: Vec<f32> = case["levels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let values: Vec<f32> = case["pick"]
                .as_str()
                .unwrap()
                .bytes()
                .map(|d| levels[usize::from(d - b'0')])
                .collect();
            let k = case["k"].as_u64().unwrap() as usize;
            partial += usize::from(k * 64 <= values.len());
            underflow += usize::from(case["topk"] != case["route"]);
            assert_eq!(topk(&values, k), as_vec(&case["topk"]), "case {c}: topk");
            super::super::decoder::route(&values, k, false, &mut picked);
            let experts: Vec<usize> = picked.iter().map(|&(e, _)| e).collect();
            assert_eq!(experts, as_vec(&case["route"]), "case {c}: route");
        }
        assert!(partial >= 20, "{partial} partial_sort cases");
        // Rows whose probabilities underflow: distinct logits tie after the softmax.
        assert!(
            underflow >= 5,
            "{underflow} cases where route differs from topk"
        );
    }
}
