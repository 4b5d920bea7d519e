//! The substitution goal's work. Running substituters is a later issue: today a path is
//! either valid already or fails with "no substituter".

use super::*;

impl Worker {
    // ----- substitution goals ------------------------------------------------------------

    pub(super) fn subst_work(&mut self, id: GoalId) {
        let path = self.goals[id.index()].path().clone();
        let state = match &mut self.goals[id.index()].kind {
            GoalKind::Substitution { state, .. } => std::mem::replace(state, SubstState::Init),
            GoalKind::Derivation { .. } => return,
        };
        let next = match state {
            SubstState::Init => match self.store.is_valid(&path) {
                Ok(true) => SubstState::Done(Outcome::Success {
                    outputs: Box::new([]),
                    built: false,
                }),
                Ok(false) => SubstState::TryNext {
                    remaining: self.cfg.substituters.clone(),
                },
                Err(e) => SubstState::Done(Outcome::Failed(io_msg(e))),
            },
            SubstState::TryNext { remaining } => {
                // Running substituters is a later issue: with none (or none that can),
                // the path cannot be made.
                let _ = remaining;
                SubstState::Done(Outcome::Failed(Failure::new(
                    FailureKind::NoSubstituter,
                    format!(
                        "path '{}' is required, but there is no substituter that can build it",
                        self.store.print(&path)
                    ),
                )))
            }
            other @ (SubstState::WaitingForReferences { .. }
            | SubstState::WaitingForSlot { .. }
            | SubstState::WaitingForLock { .. }
            | SubstState::Running { .. }
            | SubstState::Done(_)) => other,
        };
        let again = matches!(next, SubstState::TryNext { .. });
        self.transition(id, NewState::Subst(next));
        if again {
            self.wake(id);
        }
    }
}
