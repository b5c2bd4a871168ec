//! Tensors a kernel keeps in place of the weights it was handed, reported to whoever collects
//! them on this thread.
//!
//! A layer may hold a copy of a weight rather than the tensor its loader handed it (the CPU's
//! f32 copies of bf16 convolution weights: its GEMM has no bf16 kernel). The loader above keeps a
//! table of every tensor a network was built from, to rebuild it when its LoRAs change; it must
//! keep the copy, which the network uses, not the original, which would cost memory of its own.
//! The loader runs a network's constructor inside [`collecting`] and folds what was reported
//! into its table; outside [`collecting`], [`report`] does nothing.

use std::cell::RefCell;

use candle_core::Tensor;

thread_local! {
    /// The substitutes reported on this thread while a [`collecting`] call runs (constructors
    /// run synchronously on the loading thread).
    static COLLECTED: RefCell<Option<Vec<(String, Tensor)>>> = const { RefCell::new(None) };
}

/// Runs `build` and returns what it returned with the substitutes reported meanwhile, by the
/// checkpoint name of the tensor each replaces, in order. Calls nest: an inner call's
/// substitutes are its own.
pub fn collecting<R>(build: impl FnOnce() -> R) -> (R, Vec<(String, Tensor)>) {
    let previous = COLLECTED.with(|c| c.replace(Some(Vec::new())));
    let built = build();
    let collected = COLLECTED.with(|c| c.replace(previous)).unwrap_or_default();
    (built, collected)
}

/// Reports that the layer keeps `tensor` in place of the weight named `name` (when a
/// [`collecting`] call runs on this thread; else does nothing).
pub fn report(name: &str, tensor: &Tensor) {
    COLLECTED.with(|c| {
        if let Some(collected) = c.borrow_mut().as_mut() {
            collected.push((name.to_string(), tensor.clone()));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reports_reach_only_the_innermost_collector_and_none_outside() {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        report("outside", &t(0.0));
        let (((), inner), outer) = collecting(|| {
            report("a", &t(1.0));
            let inner = collecting(|| report("b", &t(2.0)));
            report("c", &t(3.0));
            inner
        });
        let names = |v: &[(String, Tensor)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        assert_eq!(names(&outer), ["a", "c"]);
        assert_eq!(names(&inner), ["b"]);
        assert_eq!(outer[1].1.to_vec1::<f32>().unwrap(), [3.0]);
    }
}
