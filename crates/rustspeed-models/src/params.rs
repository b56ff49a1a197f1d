//! Where every parameter lives: one flat buffer per model, layer after layer, with named views.
//!
//! A layer's own parameters are contiguous, so ZeRO-3 can gather a layer as one range and the
//! engine can start a layer's gradient reduce-scatter as one range. Tied parameters (GPT-2's
//! `lm_head` sharing `transformer.wte.weight`) live once, in the layer that owns them; other
//! layers refer to them by name.

use std::collections::HashMap;
use std::ops::Range;

/// A parameter as a layer declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// The tensor's name in the HF checkpoint, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape as stored in the HF checkpoint (Linear `[out, in]`, GPT-2 Conv1D `[in, out]`).
    pub shape: Vec<usize>,
    /// Frozen parameters get no gradient and no optimizer state.
    pub trainable: bool,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            trainable: true,
        }
    }

    /// The same parameter, trainable or frozen.
    pub fn with_trainable(mut self, trainable: bool) -> Self {
        self.trainable = trainable;
        self
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parameter placed in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamSlot {
    pub spec: ParamSpec,
    /// Element offset in the flat parameter buffer (and in the flat gradient buffer).
    pub offset: usize,
    /// Index of the layer that owns it.
    pub layer: usize,
}

impl ParamSlot {
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.spec.numel()
    }
}

/// The placement of all of a model's parameters.
#[derive(Clone, Debug, Default)]
pub struct ParamLayout {
    slots: Vec<ParamSlot>,
    by_name: HashMap<String, usize>,
    /// For each layer, the slots it uses in the order its forward expects them (own, then tied).
    layer_slots: Vec<Vec<usize>>,
    /// For each layer, the range of the flat buffer holding its own parameters.
    layer_ranges: Vec<Range<usize>>,
    total: usize,
}

/// A name used by a layer that no earlier layer declared, or declared twice.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("parameter `{0}` is declared by two layers")]
    Duplicate(String),
    #[error("layer {layer} uses tied parameter `{name}`, which no earlier layer declares")]
    UnknownTied { layer: usize, name: String },
}

impl ParamLayout {
    /// Lays out the layers' parameters: `own[i]` are layer i's parameters, `tied[i]` the names of
    /// parameters it borrows from earlier layers.
    pub fn new(own: &[Vec<ParamSpec>], tied: &[Vec<String>]) -> Result<Self, LayoutError> {
        let mut layout = ParamLayout::default();
        for (layer, specs) in own.iter().enumerate() {
            let start = layout.total;
            let mut ids = Vec::with_capacity(specs.len());
            for spec in specs {
                if layout.by_name.contains_key(&spec.name) {
                    return Err(LayoutError::Duplicate(spec.name.clone()));
                }
                let id = layout.slots.len();
                layout.by_name.insert(spec.name.clone(), id);
                layout.slots.push(ParamSlot {
                    spec: spec.clone(),
                    offset: layout.total,
                    layer,
                });
                layout.total += spec.numel();
                ids.push(id);
            }
            for name in tied.get(layer).into_iter().flatten() {
                let id = *layout
                    .by_name
                    .get(name)
                    .ok_or_else(|| LayoutError::UnknownTied {
                        layer,
                        name: name.clone(),
                    })?;
                ids.push(id);
            }
            layout.layer_slots.push(ids);
            layout.layer_ranges.push(start..layout.total);
        }
        Ok(layout)
    }

    /// Total number of elements of the flat buffer.
    pub fn numel(&self) -> usize {
        self.total
    }

    /// Number of elements of trainable parameters.
    pub fn trainable_numel(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.spec.trainable)
            .map(|s| s.spec.numel())
            .sum()
    }

    pub fn slots(&self) -> &[ParamSlot] {
        &self.slots
    }

    pub fn get(&self, name: &str) -> Option<&ParamSlot> {
        self.by_name.get(name).map(|&i| &self.slots[i])
    }

    pub fn num_layers(&self) -> usize {
        self.layer_slots.len()
    }

    /// The range of the flat buffer holding layer `layer`'s own parameters.
    pub fn layer_range(&self, layer: usize) -> Range<usize> {
        self.layer_ranges[layer].clone()
    }

    /// The slots layer `layer` uses, in the order its forward expects them.
    pub fn layer_slots(&self, layer: usize) -> impl Iterator<Item = &ParamSlot> {
        self.layer_slots[layer].iter().map(|&i| &self.slots[i])
    }

    /// Views of layer `layer`'s parameters (own, then tied) in `buf`.
    pub fn layer_views<'a, T>(&self, layer: usize, buf: &'a [T]) -> Vec<&'a [T]> {
        self.layer_slots(layer).map(|s| &buf[s.range()]).collect()
    }

    /// Mutable, disjoint views of layer `layer`'s parameters in `buf` (typically the gradient).
    pub fn layer_views_mut<'a, T>(&self, layer: usize, buf: &'a mut [T]) -> Vec<&'a mut [T]> {
        let ranges: Vec<Range<usize>> = self.layer_slots(layer).map(|s| s.range()).collect();
        disjoint_mut(buf, &ranges)
    }
}

/// Splits `buf` into mutable views of `ranges`, returned in the order given.
/// Panics if two ranges overlap (a layer declaring the same parameter twice).
pub fn disjoint_mut<'a, T>(mut buf: &'a mut [T], ranges: &[Range<usize>]) -> Vec<&'a mut [T]> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut out: Vec<Option<&'a mut [T]>> = (0..ranges.len()).map(|_| None).collect();
    let mut consumed = 0;
    for i in order {
        let r = &ranges[i];
        assert!(
            r.start >= consumed,
            "overlapping parameter views at {}..{}",
            r.start,
            r.end
        );
        let rest = std::mem::take(&mut buf);
        let (_, tail) = rest.split_at_mut(r.start - consumed);
        let (view, tail) = tail.split_at_mut(r.len());
        out[i] = Some(view);
        buf = tail;
        consumed = r.end;
    }
    out.into_iter()
        .map(|v| v.expect("every range visited"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, shape: &[usize]) -> ParamSpec {
        ParamSpec::new(name, shape)
    }

    #[test]
    fn layers_are_contiguous_and_tied_params_resolve_to_their_owner() {
        let own = vec![
            vec![spec("wte", &[10, 4]), spec("wpe", &[8, 4])],
            vec![spec("ln.weight", &[4]), spec("ln.bias", &[4])],
        ];
        let tied = vec![vec![], vec!["wte".to_string()]];
        let layout = ParamLayout::new(&own, &tied).unwrap();
        assert_eq!(layout.numel(), 40 + 32 + 8);
        assert_eq!(layout.layer_range(0), 0..72);
        assert_eq!(layout.layer_range(1), 72..80);
        let names: Vec<_> = layout
            .layer_slots(1)
            .map(|s| s.spec.name.as_str())
            .collect();
        assert_eq!(names, ["ln.weight", "ln.bias", "wte"]);
        assert_eq!(layout.get("wte").unwrap().range(), 0..40);
    }

    #[test]
    fn mutable_views_follow_declaration_order() {
        let mut buf: Vec<u32> = (0..10).collect();
        let views = disjoint_mut(&mut buf, &[6..8, 0..2, 3..4]);
        assert_eq!(views[0], [6, 7]);
        assert_eq!(views[1], [0, 1]);
        assert_eq!(views[2], [3]);
    }

    #[test]
    #[should_panic(expected = "overlapping")]
    fn overlapping_views_panic() {
        let mut buf = [0u8; 4];
        disjoint_mut(&mut buf, &[0..2, 1..3]);
    }

    #[test]
    fn layout_errors_name_the_parameter() {
        let dup = ParamLayout::new(&[vec![spec("a", &[1])], vec![spec("a", &[1])]], &[]);
        assert!(dup.unwrap_err().to_string().contains("`a`"));
        let unknown = ParamLayout::new(&[vec![spec("a", &[1])]], &[vec!["b".into()]]);
        assert!(unknown.unwrap_err().to_string().contains("`b`"));
    }
}
