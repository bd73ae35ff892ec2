//! A tiny, lossless XML element tree over quick-xml, for *editing* libvirt XML.
//!
//! Parsing keeps every element, attribute (in order), text, comment and CDATA section, so writing
//! the tree back gives the same document modulo insignificant formatting (the XML declaration and
//! processing instructions are dropped: libvirt never emits them). Reading typed fields is done
//! with serde in [`super::domain`]; this module only finds and edits.

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesCData, BytesEnd, BytesStart, BytesText, Event};
use stagecore::{Error, Result};

/// A node of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// A child element.
    Element(Element),
    /// Text (unescaped).
    Text(String),
    /// A comment (raw).
    Comment(String),
    /// A CDATA section (raw).
    CData(String),
}

/// One element with its attributes and children.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Element {
    /// Qualified name (`disk`, `stage:env`).
    pub(crate) name: String,
    /// Attributes in document order, values unescaped.
    pub(crate) attrs: Vec<(String, String)>,
    /// Children in document order.
    pub(crate) children: Vec<Node>,
}

fn bad(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid(what, format!("malformed XML: {e}"))
}

impl Element {
    /// A new empty element.
    pub(crate) fn new(name: &str) -> Self {
        Element { name: name.into(), ..Default::default() }
    }

    /// Parses a whole document; `what` names it in errors (`domain web`).
    pub(crate) fn parse(xml: &str, what: &str) -> Result<Self> {
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let mut root = None;
        loop {
            let ev = reader.read_event().map_err(|e| bad(what, e))?;
            match ev {
                Event::Start(s) => stack.push(start(&s, what)?),
                Event::Empty(s) => {
                    let el = start(&s, what)?;
                    push(&mut stack, &mut root, el);
                }
                Event::End(_) => {
                    let el = stack.pop().ok_or_else(|| bad(what, "unbalanced end tag"))?;
                    push(&mut stack, &mut root, el);
                }
                Event::Text(t) => {
                    let text = t.decode().map_err(|e| bad(what, e))?;
                    let text = quick_xml::escape::unescape(&text).map_err(|e| bad(what, e))?;
                    push_text(&mut stack, &text);
                }
                Event::GeneralRef(r) => {
                    let name = r.decode().map_err(|e| bad(what, e))?;
                    let raw = format!("&{name};");
                    let text = quick_xml::escape::unescape(&raw).map_err(|e| bad(what, e))?;
                    push_text(&mut stack, &text);
                }
                Event::CData(c) => {
                    let text = String::from_utf8_lossy(&c).into_owned();
                    if let Some(top) = stack.last_mut() {
                        top.children.push(Node::CData(text));
                    }
                }
                Event::Comment(c) => {
                    let text = String::from_utf8_lossy(&c).into_owned();
                    if let Some(top) = stack.last_mut() {
                        top.children.push(Node::Comment(text));
                    }
                }
                Event::Eof => break,
                Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            }
        }
        if !stack.is_empty() {
            return Err(bad(what, "unclosed element"));
        }
        root.ok_or_else(|| bad(what, "no root element"))
    }

    /// Writes the tree as a document.
    pub(crate) fn render(&self) -> String {
        let mut w = Writer::new(Vec::new());
        self.write(&mut w).expect("writing to a Vec cannot fail");
        String::from_utf8(w.into_inner()).expect("the tree holds UTF-8 only")
    }

    fn write(&self, w: &mut Writer<Vec<u8>>) -> std::io::Result<()> {
        let mut s = BytesStart::new(self.name.as_str());
        for (k, v) in &self.attrs {
            s.push_attribute((k.as_str(), v.as_str()));
        }
        if self.children.is_empty() {
            return w.write_event(Event::Empty(s));
        }
        w.write_event(Event::Start(s))?;
        for c in &self.children {
            match c {
                Node::Element(e) => e.write(w)?,
                Node::Text(t) => w.write_event(Event::Text(BytesText::new(t)))?,
                Node::Comment(t) => w.write_event(Event::Comment(BytesText::from_escaped(t.as_str())))?,
                Node::CData(t) => w.write_event(Event::CData(BytesCData::new(t.as_str())))?,
            }
        }
        w.write_event(Event::End(BytesEnd::new(self.name.as_str())))
    }

    /// An attribute's value.
    pub(crate) fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Sets (or adds) an attribute.
    pub(crate) fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.attrs.push((name.into(), value.into())),
        }
    }

    /// Child elements.
    pub(crate) fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|c| if let Node::Element(e) = c { Some(e) } else { None })
    }

    /// Child elements, mutably.
    pub(crate) fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|c| if let Node::Element(e) = c { Some(e) } else { None })
    }

    /// The first child element called `name`.
    pub(crate) fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    /// The first child element called `name`, mutably.
    pub(crate) fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.elements_mut().find(|e| e.name == name)
    }

    /// The first child called `name`, appended if absent.
    pub(crate) fn child_or_insert(&mut self, name: &str) -> &mut Element {
        if self.child(name).is_none() {
            self.children.push(Node::Element(Element::new(name)));
        }
        self.child_mut(name).expect("just ensured")
    }

    /// Removes every child element for which `f` is true.
    pub(crate) fn remove_children(&mut self, f: impl Fn(&Element) -> bool) {
        self.children.retain(|c| !matches!(c, Node::Element(e) if f(e)));
    }

    /// The element's text content (concatenated direct text children).
    pub(crate) fn text(&self) -> String {
        self.children.iter().filter_map(|c| if let Node::Text(t) = c { Some(t.as_str()) } else { None }).collect()
    }

    /// Replaces the children with one text node.
    pub(crate) fn set_text(&mut self, text: &str) {
        self.children = vec![Node::Text(text.into())];
    }
}

fn start(s: &BytesStart<'_>, what: &str) -> Result<Element> {
    let name = String::from_utf8_lossy(s.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(|e| bad(what, e))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a.unescape_value().map_err(|e| bad(what, e))?.into_owned();
        attrs.push((key, value));
    }
    Ok(Element { name, attrs, children: Vec::new() })
}

/// Appends text to the open element, merging with a preceding text node.
fn push_text(stack: &mut [Element], text: &str) {
    if let Some(top) = stack.last_mut() {
        match top.children.last_mut() {
            Some(Node::Text(t)) => t.push_str(text),
            _ => top.children.push(Node::Text(text.to_string())),
        }
    }
}

fn push(stack: &mut [Element], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some(parent) => parent.children.push(Node::Element(el)),
        None => *root = Some(el),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"<domain type='kvm' id='3'>
  <name>web</name>
  <uuid>0df001d4-4d8b-4f4b-a434-15bb4cde15a6</uuid>
  <!-- a comment & more -->
  <description>Web &amp; "front" tier</description>
  <metadata>
    <other:thing xmlns:other="https://example.invalid/x">keep me</other:thing>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <cpu mode='host-passthrough'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/libvirt/images/web.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/b.qcow2'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:AA:bb:cc'/>
      <source bridge='br0'/>
      <model type='e1000'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:00:00:01'/>
      <source network='backend'/>
      <alias name='ua-data'/>
    </interface>
    <serial type='pty'/>
  </devices>
</domain>"#;

    #[test]
    fn round_trip_keeps_everything() {
        let tree = Element::parse(SAMPLE, "sample").unwrap();
        let again = Element::parse(&tree.render(), "again").unwrap();
        assert_eq!(tree, again);
        let text = tree.render();
        for kept in ["a comment &amp; more", "keep me", "host-passthrough", "cache='none'", "<serial"] {
            let kept = kept.replace('\'', "\"");
            assert!(text.contains(&kept) || text.contains(kept.replace("&amp;", "&").as_str()), "{kept} in {text}");
        }
        assert_eq!(tree.child("description").unwrap().text(), "Web & \"front\" tier");
    }

    #[test]
    fn malformed_xml_is_invalid_spec() {
        for bad in ["<domain>", "<a></b>", ""] {
            let e = Element::parse(bad, "domain x").unwrap_err();
            assert!(matches!(e, Error::InvalidSpec { ref path, .. } if path == "domain x"), "{bad}: {e}");
        }
    }
}
