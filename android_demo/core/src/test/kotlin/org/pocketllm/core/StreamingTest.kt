package org.pocketllm.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test

class StreamingTest {
    private fun feed(filter: StopTextFilter, vararg pieces: String): List<String> = pieces.map { filter.push(it) }

    @Test
    fun aStopTextSplitAcrossPiecesNeverShows() {
        val f = StopTextFilter(listOf("<|im_end|>"))
        assertEquals(listOf("Hel", "lo", "", ""), feed(f, "Hel", "lo<|im", "_end|>", " after"))
        assertTrue(f.stopped)
        assertEquals("", f.finish())
    }

    @Test
    fun aHeldBackTailIsReleasedWhenItIsNotAStopText() {
        val f = StopTextFilter(listOf("<|im_end|>"))
        assertEquals(listOf("a", "<b"), feed(f, "a<", "b"))
        assertFalse(f.stopped)
        assertEquals(listOf("x", ""), feed(f, "x<|im", ""))
        assertEquals("<|im", f.finish())
    }

    @Test
    fun theEarliestOfSeveralStopTextsWins() {
        val f = StopTextFilter(listOf("<|im_end|>", "</s>"))
        assertEquals("answer", f.push("answer</s> more <|im_end|>"))
        assertTrue(f.stopped)
        assertEquals("", f.push("ignored"))
    }

    @Test
    fun withoutStopTextsEverythingPassesThrough() {
        val f = StopTextFilter(emptyList())
        assertEquals("<|im_end|>", f.push("<|im_end|>"))
        assertFalse(f.stopped)
    }
}
