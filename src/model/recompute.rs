//! Activation recomputation ("gradient checkpointing") of a forward segment, a transformer block.
//!
//! A training forward normally keeps every intermediate of every block alive until the backward
//! pass has used it: attention scores, MLP activations, LoRA inputs. With recomputation a block
//! keeps only its input: [`segment`] runs the block once without keeping its graph, and the
//! backward pass runs it again, differentiably, from the saved input and backpropagates through
//! that copy. Peak memory falls from all blocks' intermediates to one block's, for one more block
//! forward per block in the backward pass.
//!
//! The recomputed forward must be the same function: dropout masks are derived from a seed and
//! the layer (`super::linear::Dropout`), so they are drawn again identically.
//!
//! The segment's trainable variables (its LoRA factors) are not inputs of the outer graph, so
//! their gradients cannot travel through it. The segment's backward hands them to the
//! [`backward`] that is running on this thread, which adds them to the gradients it returns. A
//! plain `loss.backward()` over a recomputed segment is an error, never silently missing
//! gradients.
//!
//! Blocks trained on the CPU in f32 do not need segments: they are single graph nodes
//! (`super::block_node`) that recompute themselves and pass their adapters' gradients through
//! the graph. Segments serve the other devices and dtypes, and the block kinds the node does
//! not take.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, Var};
use std::cell::RefCell;
use std::sync::Arc;

/// A segment's forward: input `[batch, seq, d]` to output of the same shape. With `track`
/// false it must compute the same values without building a graph (its trainable variables
/// detached): the first run, whose graph would only be dropped.
pub type SegmentFn = Arc<dyn Fn(&Tensor, bool) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// The variables' gradients handed over by segments, one list per [`backward`] running on
    /// this thread (innermost last: a thread waiting in a parallel region may run another
    /// task's whole step, backward included, on top of its own).
    static SESSIONS: RefCell<Vec<Vec<(Tensor, Tensor)>>> = const { RefCell::new(Vec::new()) };
}

/// `f(x)`, with `f`'s intermediates recomputed in the backward pass instead of kept. `vars` are
/// the trainable variables `f` uses (their gradients reach the caller through [`backward`]);
/// every other tensor `f` uses must be a constant.
pub fn segment(x: &Tensor, vars: &[Var], f: SegmentFn) -> Result<Tensor> {
    // No graph is built: `y` holds only its values.
    let y = f(&x.detach(), false)?.detach();
    let anchor = match vars.first() {
        Some(v) => v.as_tensor().clone(),
        None => x.clone(),
    };
    if !x.track_op() && !anchor.track_op() {
        return Ok(y);
    }
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    // The output node depends on `x` and on one variable (so that it is tracked even when `x`
    // is a constant, as the decoder's embeddings are); the backward gives only `x`'s gradient
    // to the outer graph and hands the variables' to [`backward`].
    x.apply_op2(
        &anchor,
        Segment {
            f,
            vars: vars.to_vec(),
            y,
        },
    )
}

/// `loss.backward()`, plus the gradients of the variables inside recomputed segments.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SESSIONS.with(|s| s.borrow_mut().push(Vec::new()));
    let grads = loss.backward();
    let handed = SESSIONS.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    let mut grads = grads?;
    for (v, g) in handed {
        let sum = match grads.remove(&v) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert(&v, sum);
    }
    Ok(grads)
}

struct Segment {
    f: SegmentFn,
    vars: Vec<Var>,
    /// The forward's output, computed when the segment was made.
    y: Tensor,
}

impl Segment {
    fn check(&self, shape: &Shape) -> Result<()> {
        if shape != self.y.shape() {
            candle_core::bail!(
                "recomputed segment: input {shape:?} but output {:?}",
                self.y.shape()
            );
        }
        Ok(())
    }
}

impl CustomOp2 for Segment {
    fn name(&self) -> &'static str {
        "recomputed-segment"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1.shape())?;
        let (s, l) = self.y.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*s else {
            candle_core::bail!("recomputed segment: the output is not on the CPU");
        };
        use candle_core::backend::BackendStorage;
        Ok((s.try_clone(l)?, self.y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check(l1.shape())?;
        let (s, l) = self.y.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*s else {
            candle_core::bail!("recomputed segment: the output is not on the GPU");
        };
        use candle_core::backend::BackendStorage;
        Ok((s.try_clone(l)?, self.y.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if SESSIONS.with(|s| s.borrow().is_empty()) {
            candle_core::bail!(
                "a forward with recomputed blocks needs lqa's `model::recompute::backward`, \
                 not `loss.backward()`, or its adapter gradients would be lost"
            );
        }
        // The segment again, this time keeping its graph, from a copy of its input.
        let xv = Var::from_tensor(&x.detach())?;
        let y = (self.f)(xv.as_tensor(), true)?;
        let inner = (y * grad.detach())?.sum_all()?.backward()?;
        let mut handed = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            if let Some(g) = inner.get(v.as_tensor()) {
                handed.push((v.as_tensor().clone(), g.detach()));
            }
        }
        SESSIONS.with(|s| {
            if let Some(top) = s.borrow_mut().last_mut() {
                top.extend(handed);
            }
        });
        let gx = if x.track_op() {
            inner.get(xv.as_tensor()).map(|g| g.detach())
        } else {
            None
        };
        Ok((gx, None))
    }
}
