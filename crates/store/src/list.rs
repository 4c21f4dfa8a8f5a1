//! Paged, label-filtered lists over a keyset scan. The backends scan rows in key order inside one read
//! snapshot; the [`Pager`] applies the selector and the limit, and decides whether another page follows.

use model::Resource;

use crate::cursor::Cursor;
use crate::selector::Selector;
use crate::{ListPage, ListQuery, StoreError};

/// Rows fetched per scan step when the list has no limit (or a selector filters rows out).
const SCAN_BATCH: usize = 500;

/// Accumulates one page of a list.
pub(crate) struct Pager {
    selector: Selector,
    limit: Option<usize>,
    items: Vec<Resource>,
    after: Option<Cursor>,
    more: bool,
}

impl Pager {
    /// Parses the selector and continue token of `q`. A `limit` of zero means no limit.
    pub fn new(q: &ListQuery) -> Result<Pager, StoreError> {
        let selector = match &q.selector {
            Some(s) => Selector::parse(s)?,
            None => Selector::default(),
        };
        let after = match &q.continue_token {
            Some(t) if !t.is_empty() => Some(Cursor::decode(t)?),
            _ => None,
        };
        Ok(Pager {
            selector,
            limit: q.limit.filter(|l| *l > 0),
            items: Vec::new(),
            after,
            more: false,
        })
    }

    /// Where the next scan step starts (exclusive).
    pub fn after(&self) -> Option<&Cursor> {
        self.after.as_ref()
    }

    /// How many rows the next scan step should fetch.
    pub fn batch(&self) -> usize {
        match self.limit {
            // One more than needed, to learn whether another page follows.
            Some(l) if self.selector.is_empty() => l + 1 - self.items.len(),
            Some(l) => (l + 1 - self.items.len()).clamp(64, SCAN_BATCH),
            None => SCAN_BATCH,
        }
    }

    /// Takes one scan step's rows (fetched with [`Pager::batch`]); returns true if another step is needed.
    pub fn feed(&mut self, rows: Vec<Resource>, requested: usize) -> bool {
        let exhausted = rows.len() < requested;
        for r in rows {
            if self.limit.is_some_and(|l| self.items.len() >= l) {
                if self.selector.matches(&r.metadata.labels) {
                    self.more = true;
                    return false;
                }
                self.after = Some(Cursor::of(&r));
                continue;
            }
            self.after = Some(Cursor::of(&r));
            if self.selector.matches(&r.metadata.labels) {
                self.items.push(r);
            }
        }
        !exhausted
    }

    /// The finished page, read at `revision`.
    pub fn finish(self, revision: u64) -> ListPage {
        let continue_token = if self.more {
            self.items.last().map(|r| Cursor::of(r).encode())
        } else {
            None
        };
        ListPage {
            items: self.items,
            continue_token,
            revision,
        }
    }
}
