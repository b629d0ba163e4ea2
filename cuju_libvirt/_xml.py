"""Safe reading and careful editing of domain XML documents (private helpers).

Reading: one lxml parser configured against hostile input (no entity resolution, no
network, no DTD loading, no huge trees), a size cap, and any DOCTYPE refused outright,
which rules out entity expansion ("billion laughs") and external entities (XXE).

Editing: :func:`insert_child` and :func:`remove_child` keep the indentation of the
surrounding document and are exact inverses of each other, so that adding an element
and removing it again gives back the original document, whitespace included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from lxml import etree

from cuju_libvirt.errors import NotADomainXMLError

#: Largest domain XML accepted, in bytes (libvirt's own domain XMLs are a few KiB).
MAX_XML_BYTES = 10 * 1024 * 1024

_DECLARATION_BYTES = re.compile(rb"\A(?:\xef\xbb\xbf)?<\?xml[^>]*\?>")
_DECLARATION_STR = re.compile(r"\A\ufeff?<\?xml[^>]*\?>")
# A DOCTYPE in the prolog (after the declaration, comments, PIs and blanks). Checked before
# parsing so that not even the internal subset of a hostile document is looked at.
_DOCTYPE_BYTES = re.compile(rb"\A(?:\xef\xbb\xbf)?(?:\s|<\?.*?\?>|<!--.*?-->)*<!DOCTYPE", re.DOTALL)
_DOCTYPE_STR = re.compile(r"\A\ufeff?(?:\s|<\?.*?\?>|<!--.*?-->)*<!DOCTYPE", re.DOTALL)
_DOCTYPE_REFUSED = (
    "contains a DOCTYPE; refused (domain XML never needs one, and DTDs allow entity-expansion "
    "and external-entity attacks): remove the <!DOCTYPE ...> declaration"
)


def safe_parser() -> etree.XMLParser:
    """A parser that never expands entities, never loads a DTD and never touches the network."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
        remove_comments=False,
        remove_pis=False,
        strip_cdata=False,
    )


def parse_xml(data: str | bytes, what: str = "domain XML") -> tuple[etree._ElementTree, str | bytes]:
    """Parse ``data`` safely; returns the tree and the XML declaration as written ('' if none).

    Raises :class:`NotADomainXMLError` for oversized, malformed or DOCTYPE-carrying input.
    """
    size = len(data.encode("utf-8", "replace") if isinstance(data, str) else data)
    if size > MAX_XML_BYTES:
        raise NotADomainXMLError(
            f"{what} is {size} bytes, more than the {MAX_XML_BYTES // (1024 * 1024)} MiB accepted"
        )
    if (_DOCTYPE_STR.match(data) if isinstance(data, str) else _DOCTYPE_BYTES.match(data)) is not None:
        raise NotADomainXMLError(f"{what} {_DOCTYPE_REFUSED}")
    declaration: str | bytes
    try:
        if isinstance(data, str):
            # lxml refuses str input that carries an encoding declaration: keep it aside.
            match = _DECLARATION_STR.match(data)
            declaration = match.group(0) if match else ""
            root = etree.fromstring(data[len(declaration) :], safe_parser())
        else:
            bmatch = _DECLARATION_BYTES.match(data)
            declaration = bmatch.group(0) if bmatch else b""
            root = etree.fromstring(data, safe_parser())
    except etree.XMLSyntaxError as err:
        raise NotADomainXMLError(f"{what} is not well-formed XML: {err}") from err
    except ValueError as err:  # e.g. unsupported encoding declarations
        raise NotADomainXMLError(f"{what} cannot be read: {err}") from err
    tree = root.getroottree()
    doctype = str(getattr(tree.docinfo, "doctype", "") or "")
    if doctype or tree.docinfo.internalDTD is not None:
        raise NotADomainXMLError(f"{what} {_DOCTYPE_REFUSED}")
    return tree, declaration


@dataclass
class Document:
    """A parsed XML document that serialises back in the form it was read (str or bytes)."""

    tree: etree._ElementTree
    declaration: str | bytes
    was_bytes: bool

    @classmethod
    def parse(cls, data: str | bytes, what: str = "domain XML") -> Document:
        tree, declaration = parse_xml(data, what)
        return cls(tree, declaration, isinstance(data, bytes))

    @property
    def root(self) -> etree._Element:
        return self.tree.getroot()

    def _top_level(self) -> list[etree._Element]:
        root = self.root
        before = list(root.itersiblings(preceding=True))
        before.reverse()
        return [*before, root, *root.itersiblings()]

    def to_bytes(self) -> bytes:
        encoding = self.tree.docinfo.encoding or "UTF-8"
        if isinstance(self.declaration, bytes) and self.declaration:
            head = self.declaration + b"\n"
        elif self.declaration:
            head = str(self.declaration).encode(encoding) + b"\n"
        else:
            head = b""
        parts = [
            cast(bytes, etree.tostring(node, encoding=encoding, xml_declaration=False))
            for node in self._top_level()
        ]
        return head + b"\n".join(parts) + b"\n"

    def to_str(self) -> str:
        head = self.declaration if isinstance(self.declaration, str) else self.declaration.decode("ascii")
        head = head + "\n" if head else ""
        parts = [etree.tostring(node, encoding="unicode") for node in self._top_level()]
        return head + "\n".join(parts) + "\n"

    def dump(self) -> str | bytes:
        """The document in the type it was read from."""
        return self.to_bytes() if self.was_bytes else self.to_str()


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _space_before(parent: etree._Element, index: int) -> str | None:
    return parent.text if index == 0 else parent[index - 1].tail


def _set_space_before(parent: etree._Element, index: int, text: str | None) -> None:
    if index == 0:
        parent.text = text
    else:
        parent[index - 1].tail = text


def indent_of(element: etree._Element) -> str | None:
    """The spaces after the last newline before ``element`` ('' for the root), None if compact."""
    parent = element.getparent()
    if parent is None:
        return ""
    before = _space_before(parent, parent.index(element))
    if before is None or "\n" not in before or not _blank(before):
        return None
    return before[before.rindex("\n") + 1 :]


def child_indent(parent: etree._Element) -> str | None:
    """The whitespace that should precede a new last child of ``parent`` (None: compact XML)."""
    if len(parent) and parent.text is not None and _blank(parent.text) and "\n" in parent.text:
        return parent.text
    own = indent_of(parent)
    if own is None:
        return None
    step = "  "
    grand = parent.getparent()
    if grand is not None:
        grand_indent = indent_of(grand)
        if grand_indent is not None and own.startswith(grand_indent) and len(own) > len(grand_indent):
            step = own[len(grand_indent) :]
    return "\n" + own + step


def insert_child(parent: etree._Element, child: etree._Element, index: int | None = None) -> None:
    """Insert ``child`` at ``index`` (default: last), indented like its siblings.

    Exact inverse of :func:`remove_child`: the whitespace before the insertion point stays
    where it is and the new element takes over what followed it.
    """
    count = len(parent)
    index = count if index is None else index
    before = _space_before(parent, index)
    if not _blank(before):
        # Mixed content (never in domain XML): leave the text alone.
        child.tail = None
        parent.insert(index, child)
        return
    if index < count:
        # In the middle: the next sibling keeps the whitespace it had; the new element
        # gets a copy of it as its tail.
        child.tail = before
        parent.insert(index, child)
        return
    indent = child_indent(parent)
    child.tail = before
    parent.insert(index, child)
    if indent is not None:
        _set_space_before(parent, index, indent)


def close_indent(parent: etree._Element) -> None:
    """Give a freshly built ``parent`` a closing newline+indent after its last child."""
    if len(parent) and parent[-1].tail is None:
        own = indent_of(parent)
        if own is not None:
            parent[-1].tail = "\n" + own


def remove_child(child: etree._Element) -> None:
    """Remove ``child`` and the whitespace that introduced it, keeping what followed it."""
    parent = child.getparent()
    if parent is None:
        raise ValueError("cannot remove the root element")
    index = parent.index(child)
    before = _space_before(parent, index)
    after = child.tail
    parent.remove(child)  # takes its tail with it; the whitespace is set explicitly below
    if _blank(before):
        _set_space_before(parent, index, after)
    else:
        _set_space_before(parent, index, (before or "") + (after or ""))


def is_empty(element: etree._Element) -> bool:
    """No children of any kind, no attributes and no text other than whitespace."""
    return len(element) == 0 and not element.attrib and _blank(element.text)
