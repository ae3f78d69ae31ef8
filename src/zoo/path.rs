//! Module paths as checkpoints and recipes name them. burn's derive gives an enum module's variant a path segment of
//! its own (`Connector::Mlp` visits as `…multi_modal_projector.Mlp.layers.0…`); the zoo's component enums
//! (`Connector`, …) are transparent here, so key tables, part names, LoRA targets and resume ids do not depend on
//! which variant a model holds. Every `ModuleVisitor`/`ModuleMapper` of the crate keeps its path in a [`PathStack`].

/// The stack of (name, container type) that burn's `enter_module`/`exit_module` calls describe.
#[derive(Debug, Default, Clone)]
pub struct PathStack {
    segs: Vec<(String, String)>,
}

impl PathStack {
    pub fn enter(&mut self, name: &str, container: &str) {
        self.segs.push((name.to_string(), container.to_string()));
    }
    pub fn exit(&mut self) {
        self.segs.pop();
    }
    /// The visible segments: (name, container type), enum variants left out.
    pub fn segments(&self) -> impl Iterator<Item = (&str, &str)> {
        self.segs
            .iter()
            .filter(|(_, c)| !c.starts_with("Enum:"))
            .map(|(n, c)| (n.as_str(), c.as_str()))
    }
    /// `a.b.c`, enum variants left out.
    pub fn path(&self) -> String {
        self.segments()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
            .join(".")
    }
    /// The innermost visible (name, container type).
    pub fn last(&self) -> Option<(&str, &str)> {
        self.segments().last()
    }
    /// Whether any enclosing container is of this type (e.g. `Reparameterization`: inside a LoRA adapter).
    pub fn inside(&self, container: &str) -> bool {
        self.segs.iter().any(|(_, c)| c == container)
    }
    /// Whether any visible segment has this name.
    pub fn has(&self, name: &str) -> bool {
        self.segments().any(|(n, _)| n == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn enum_variants_are_transparent() {
        let mut s = PathStack::default();
        s.enter("multi_modal_projector", "Struct:Llava");
        s.enter("Mlp", "Enum:Connector");
        s.enter("layers", "Vec");
        s.enter("0", "Struct:Linear");
        s.enter("weight", "Struct:Linear");
        assert_eq!(s.path(), "multi_modal_projector.layers.0.weight");
        assert_eq!(s.last(), Some(("weight", "Struct:Linear")));
        s.exit();
        s.exit();
        s.exit();
        s.exit();
        assert_eq!(s.path(), "multi_modal_projector");
    }
}
