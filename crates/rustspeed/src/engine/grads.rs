//! Backward through the layers into the flat fp32 gradient buffer.
//!
//! Layers receive one gradient view per parameter they use. Trainable parameters' views lie in
//! the flat buffer (so micro-batches accumulate there); frozen parameters have no gradient
//! storage, and get a zeroed scratch view that is dropped with the layer's backward: it is
//! transient, like activations, and not part of the model states.

use rustspeed_kernels::Float;
use rustspeed_models::params::disjoint_mut;
use rustspeed_models::{Ctx, Flow, Layer, Model};

use crate::optimizer::FlatLayout;

pub(super) fn backward<T: Float>(
    model: &mut Model<T>,
    flat: &FlatLayout,
    grads: &mut [f32],
    ctx: &Ctx,
) {
    let mut flow = Flow::default();
    for i in (0..model.layers.len()).rev() {
        with_grad_views(model, flat, grads, i, |layer, params, views| {
            layer.backward(params, views, &mut flow, ctx);
            layer.clear();
        });
    }
}

/// Calls `f` with layer `i`, its parameter views and its gradient views, as backward
/// hands them out: trainable parameters' views lie in the flat buffer (a tied weight's in its
/// owner's slot), frozen ones get a zeroed scratch view dropped afterwards.
pub(super) fn with_grad_views<T: Float, R>(
    model: &mut Model<T>,
    flat: &FlatLayout,
    grads: &mut [f32],
    i: usize,
    f: impl FnOnce(&mut dyn Layer<T>, &[&[T]], &mut [&mut [f32]]) -> R,
) -> R {
    let slots = model.layout.slots();
    let used: Vec<usize> = model
        .layout
        .layer_slots(i)
        .map(|s| {
            slots
                .iter()
                .position(|t| std::ptr::eq(t, s))
                .expect("layer slots come from the layout")
        })
        .collect();
    let trainable: Vec<_> = used
        .iter()
        .filter_map(|&s| flat.slot_flat[s].clone())
        .collect();
    let mut flat_views = disjoint_mut(grads, &trainable).into_iter();
    let mut scratch: Vec<Vec<f32>> = used
        .iter()
        .filter(|&&s| flat.slot_flat[s].is_none())
        .map(|&s| vec![0.0; slots[s].spec.numel()])
        .collect();
    let mut scratch_views = scratch.iter_mut();
    let mut views: Vec<&mut [f32]> = used
        .iter()
        .map(|&s| match flat.slot_flat[s] {
            Some(_) => flat_views.next().expect("one view per trainable slot"),
            None => scratch_views
                .next()
                .expect("one scratch per frozen slot")
                .as_mut_slice(),
        })
        .collect();
    let params = model.layout.layer_views(i, &model.params);
    f(model.layers[i].as_mut(), &params, &mut views)
}
