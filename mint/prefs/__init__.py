"""Answer formats and the teacher-rankings -> preference-pairs builder."""
