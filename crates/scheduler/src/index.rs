//! The fleet index: nodes in a slab, and candidate sets keyed by (model, region, kind) so that
//! `decide` looks only at nodes that can take a job instead of scanning the fleet.
//!
//! A node with a free slot (and eligible, within its SoC reserve) is in the `Free` sets of every
//! (model, region) pair it has, plus (model, any-region). A full node running batch work is in
//! the `Preemptible` sets instead. Sets are `Vec`s with swap-remove; every node remembers its
//! positions, so joining and leaving cost O(models x regions).

use crate::hint::prefetch;
use crate::policy::Card;
use crate::rng::FxHashMap as HashMap;
use crate::types::{NodeId, NodeView};

/// Region id standing for "any region".
pub(crate) const ANY_REGION: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Free,
    Preemptible,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SetKey {
    pub model: u32,
    pub region: u32,
    pub kind: Kind,
}

#[derive(Default)]
pub(crate) struct Interner {
    map: HashMap<String, u32>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.map.get(s) {
            return id;
        }
        let id = self.map.len() as u32;
        self.map.insert(s.to_string(), id);
        id
    }

    pub fn get(&self, s: &str) -> Option<u32> {
        self.map.get(s).copied()
    }
}

pub(crate) struct Entry {
    pub view: NodeView,
    models: Vec<u32>,
    regions: Vec<u32>,
    state: Option<Kind>,
    /// (set id, position) of every set the node is in.
    positions: Vec<(u32, u32)>,
    /// Bumped on every change of the view: a copy of the card taken at version `v` is current
    /// while the version is still `v`.
    version: u32,
}

/// A candidate set member: the node's slot and a copy of its scoring card, so that scoring a
/// run of candidates reads one contiguous array (a million-node fleet does not fit in cache).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Member {
    pub slot: u32,
    /// The entry's version the card was copied at (kept in step by `refresh`).
    pub version: u32,
    pub card: Card,
}

#[derive(Default)]
pub(crate) struct FleetIndex {
    pub models: Interner,
    pub regions: Interner,
    slots: Vec<Option<Entry>>,
    free_slots: Vec<u32>,
    by_id: SlotMap,
    set_ids: HashMap<SetKey, u32>,
    sets: Vec<Vec<Member>>,
    /// Registered nodes per (model, region): (all, attested).
    registered: HashMap<(u32, u32), (u32, u32)>,
}

/// Node id -> slot: a plain array for small ids (the simulator numbers its vehicles densely, so
/// the per-job lookup is one load instead of a hash probe), a hash map for the rest.
#[derive(Default)]
struct SlotMap {
    dense: Vec<u32>,
    sparse: HashMap<NodeId, u32>,
    len: usize,
}

impl SlotMap {
    const DENSE_MAX: u64 = 1 << 24;
    const NONE: u32 = u32::MAX;

    fn get(&self, id: NodeId) -> Option<u32> {
        if id.0 < Self::DENSE_MAX {
            self.dense
                .get(id.0 as usize)
                .copied()
                .filter(|&s| s != Self::NONE)
        } else {
            self.sparse.get(&id).copied()
        }
    }

    fn insert(&mut self, id: NodeId, slot: u32) {
        let old = if id.0 < Self::DENSE_MAX {
            let i = id.0 as usize;
            if self.dense.len() <= i {
                self.dense.resize(i + 1, Self::NONE);
            }
            std::mem::replace(&mut self.dense[i], slot) != Self::NONE
        } else {
            self.sparse.insert(id, slot).is_some()
        };
        if !old {
            self.len += 1;
        }
    }

    fn remove(&mut self, id: NodeId) -> Option<u32> {
        let old = if id.0 < Self::DENSE_MAX {
            self.dense
                .get_mut(id.0 as usize)
                .map(|s| std::mem::replace(s, Self::NONE))
                .filter(|&s| s != Self::NONE)
        } else {
            self.sparse.remove(&id)
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }
}

/// [`FleetIndex::set_id`] on the two fields it needs (`join` holds a node's entry meanwhile).
fn set_id_in(set_ids: &mut HashMap<SetKey, u32>, sets: &mut Vec<Vec<Member>>, key: SetKey) -> u32 {
    *set_ids.entry(key).or_insert_with(|| {
        sets.push(Vec::new());
        (sets.len() - 1) as u32
    })
}

fn desired_kind(v: &NodeView) -> Option<Kind> {
    if !v.eligible || !v.soc_ok() || v.slots_total == 0 {
        None
    } else if v.has_free_slot() {
        Some(Kind::Free)
    } else if !v.running_batch.is_empty() {
        Some(Kind::Preemptible)
    } else {
        None
    }
}

impl FleetIndex {
    pub fn len(&self) -> usize {
        self.by_id.len
    }

    pub fn slot_of(&self, id: NodeId) -> Option<u32> {
        self.by_id.get(id)
    }

    /// Start loading node `id`'s entry into cache (see [`crate::Scheduler::prefetch_node`]).
    pub fn prefetch(&self, id: NodeId) {
        if let Some(slot) = self.slot_of(id) {
            self.prefetch_slot(slot);
        }
    }

    /// Start loading the entry in `slot` (without reading it: no wait for the miss).
    pub fn prefetch_slot(&self, slot: u32) {
        if let Some(e) = self.slots.get(slot as usize) {
            prefetch(e);
        }
    }

    /// Start loading the candidate-set members of node `id` (reads its entry, which should be
    /// in cache by now, see [`FleetIndex::prefetch`]).
    pub fn prefetch_sets(&self, id: NodeId) {
        let Some(Some(e)) = self.slot_of(id).and_then(|s| self.slots.get(s as usize)) else {
            return;
        };
        for &(sid, pos) in &e.positions {
            if let Some(m) = self
                .sets
                .get(sid as usize)
                .and_then(|s| s.get(pos as usize))
            {
                prefetch(m);
            }
        }
    }

    pub fn entry(&self, slot: u32) -> &Entry {
        match &self.slots[slot as usize] {
            Some(e) => e,
            None => unreachable!("slot {slot} points at a removed node"),
        }
    }

    fn entry_mut(&mut self, slot: u32) -> &mut Entry {
        match &mut self.slots[slot as usize] {
            Some(e) => e,
            None => unreachable!("slot {slot} points at a removed node"),
        }
    }

    /// The entry's change counter (see [`Entry::version`]).
    pub fn version(&self, slot: u32) -> u32 {
        self.entry(slot).version
    }

    /// The node's current card if it is in the `Free` sets (it has a free slot and may compute).
    pub fn free_card(&self, slot: u32) -> Option<(u32, Card)> {
        let e = self.entry(slot);
        if e.state != Some(Kind::Free) {
            return None;
        }
        let &(sid, pos) = e.positions.first()?;
        let m = &self.sets[sid as usize][pos as usize];
        Some((m.version, m.card))
    }

    pub fn view(&self, slot: u32) -> &NodeView {
        &self.entry(slot).view
    }

    /// The id of the set `key`, created empty if it does not exist yet.
    pub fn set_id(&mut self, key: SetKey) -> u32 {
        set_id_in(&mut self.set_ids, &mut self.sets, key)
    }

    pub fn set_by_id(&self, id: u32) -> &[Member] {
        &self.sets[id as usize]
    }

    /// Registered nodes (any state) with `model` in `region`: (all, attested).
    pub fn registered(&self, model: u32, region: u32) -> (u32, u32) {
        self.registered
            .get(&(model, region))
            .copied()
            .unwrap_or((0, 0))
    }

    pub fn upsert(&mut self, view: NodeView) {
        if let Some(slot) = self.slot_of(view.id) {
            let e = self.entry(slot);
            if e.view.models == view.models
                && e.view.regions == view.regions
                && e.view.attested == view.attested
            {
                self.entry_mut(slot).view = view;
                self.refresh(slot);
                return;
            }
            self.remove(view.id);
        }
        let models: Vec<u32> = view.models.iter().map(|m| self.models.intern(m)).collect();
        let mut regions: Vec<u32> = view
            .regions
            .iter()
            .map(|r| self.regions.intern(r))
            .collect();
        regions.sort_unstable();
        regions.dedup();
        regions.push(ANY_REGION);
        for &m in &models {
            for &r in &regions {
                let c = self.registered.entry((m, r)).or_default();
                c.0 += 1;
                c.1 += u32::from(view.attested);
            }
        }
        let entry = Entry {
            models,
            regions,
            state: None,
            positions: Vec::new(),
            version: 0,
            view,
        };
        let id = entry.view.id;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(entry);
                s
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(id, slot);
        self.refresh(slot);
    }

    pub fn remove(&mut self, id: NodeId) {
        let Some(slot) = self.by_id.remove(id) else {
            return;
        };
        self.leave(slot);
        if let Some(e) = self.slots[slot as usize].take() {
            for &m in &e.models {
                for &r in &e.regions {
                    if let Some(c) = self.registered.get_mut(&(m, r)) {
                        c.0 -= 1;
                        c.1 -= u32::from(e.view.attested);
                    }
                }
            }
        }
        self.free_slots.push(slot);
    }

    /// Mutate a node's view in place (the scheduler's own assignments) and re-index it.
    pub fn modify(&mut self, slot: u32, f: impl FnOnce(&mut NodeView)) {
        f(&mut self.entry_mut(slot).view);
        self.refresh(slot);
    }

    fn refresh(&mut self, slot: u32) {
        let Some(e) = &mut self.slots[slot as usize] else {
            return;
        };
        e.version = e.version.wrapping_add(1);
        let e = &*e;
        let version = e.version;
        let card = Card::of(&e.view);
        let want = desired_kind(&e.view);
        if want == e.state {
            let sets = &mut self.sets;
            for &(sid, pos) in &e.positions {
                let m = &mut sets[sid as usize][pos as usize];
                m.card = card;
                m.version = e.version;
            }
            return;
        }
        self.leave(slot);
        if let Some(kind) = want {
            self.join(slot, kind, card, version);
        }
    }

    fn join(&mut self, slot: u32, kind: Kind, card: Card, version: u32) {
        let e = match &mut self.slots[slot as usize] {
            Some(e) => e,
            None => return,
        };
        e.state = Some(kind);
        for &model in &e.models {
            for &region in &e.regions {
                let key = SetKey {
                    model,
                    region,
                    kind,
                };
                let sid = set_id_in(&mut self.set_ids, &mut self.sets, key);
                let set = &mut self.sets[sid as usize];
                e.positions.push((sid, set.len() as u32));
                set.push(Member {
                    slot,
                    version,
                    card,
                });
            }
        }
    }

    fn leave(&mut self, slot: u32) {
        let positions = match &mut self.slots[slot as usize] {
            Some(e) => {
                e.state = None;
                std::mem::take(&mut e.positions)
            }
            None => return,
        };
        for &(sid, pos) in &positions {
            let set = &mut self.sets[sid as usize];
            set.swap_remove(pos as usize);
            if let Some(moved) = set.get(pos as usize) {
                if let Some(m) = &mut self.slots[moved.slot as usize] {
                    if let Some(p) = m.positions.iter_mut().find(|(k, _)| *k == sid) {
                        p.1 = pos;
                    }
                }
            }
        }
        // Keep the allocation for the next join.
        if let Some(e) = &mut self.slots[slot as usize] {
            let mut positions = positions;
            positions.clear();
            e.positions = positions;
        }
    }
}
