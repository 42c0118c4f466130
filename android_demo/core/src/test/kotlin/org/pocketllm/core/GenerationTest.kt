package org.pocketllm.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test

class GenerationTest {
    // The shape ExecuTorch's stats_to_json_string (extension/llm/runner/stats.h) hands LlmCallback.onStats.
    private val runnerStats = "{\"prefill_token_per_sec\":200,\"decode_token_per_sec\":25,\"prompt_tokens\":40," +
        "\"generated_tokens\":50,\"model_load_start_ms\":1000,\"model_load_end_ms\":1900," +
        "\"inference_start_ms\":2000,\"inference_end_ms\":4200,\"prompt_eval_end_ms\":2200," +
        "\"first_token_ms\":2210,\"aggregate_sampling_time_ms\":12,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}"

    @Test
    fun statsGivePrefillAndDecodeRatesAsTheRunnerComputesThem() {
        val s = GenerationStats.fromRunnerJson(runnerStats)
        assertEquals(40L, s.promptTokens)
        assertEquals(50L, s.generatedTokens)
        assertEquals(200L, s.prefillMs)
        assertEquals(2000L, s.decodeMs)
        assertEquals(200.0, s.prefillTokensPerSecond!!, 1e-9)  // 40 tokens / 0.2 s
        assertEquals(25.0, s.decodeTokensPerSecond!!, 1e-9)  // 50 tokens / 2 s
        assertEquals(210L, s.firstTokenMs)
        assertEquals(900L, s.modelLoadMs)
        assertEquals("prefill 200.0 tok/s · decode 25.0 tok/s", s.summary())
    }

    @Test
    fun aPhaseWithoutMeasurableTimeHasNoRate() {
        val s = GenerationStats.fromRunnerJson(runnerStats.replace("\"prompt_eval_end_ms\":2200", "\"prompt_eval_end_ms\":2000"))
        assertNull(s.prefillTokensPerSecond)
        assertTrue(s.summary().startsWith("prefill – tok/s"))
    }

    @Test(expected = IllegalArgumentException::class)
    fun statsWithoutTimesAreRefused() {
        GenerationStats.fromRunnerJson("{\"prompt_tokens\": 3}")
    }

    @Test
    fun settingsAreCheckedAgainstTheRuntimeAndTheContext() {
        assertEquals(emptyList<String>(), GenerationSettings().problems(4096))
        val bad = GenerationSettings(temperature = 1.5f, topP = 0f, maxNewTokens = 4096)
        val problems = bad.problems(4096)
        assertEquals(3, problems.size)
        assertTrue(problems[0], problems[0].startsWith("temperature must be in [0, 1]"))
        val fixed = bad.clamped(4096)
        assertEquals(emptyList<String>(), fixed.problems(4096))
        assertEquals(1f, fixed.temperature, 0f)
        assertEquals(4095, fixed.maxNewTokens)
    }

    @Test
    fun theTokenBudgetStopsAtMaxNewTokens() {
        val budget = TokenBudget(3)
        assertEquals(listOf(false, false, true), listOf(budget.onPiece(), budget.onPiece(), budget.onPiece()))
        assertEquals(3, budget.used)
    }

    @Test
    fun executorchErrorCodesMapToWhatTheUserCanDo() {
        assertEquals(RuntimeFailure.OUT_OF_MEMORY, RuntimeFailure.classify(0x21, false))
        assertEquals(RuntimeFailure.OUT_OF_MEMORY, RuntimeFailure.classify(0x25, true))
        assertEquals(RuntimeFailure.MISSING_OPERATOR, RuntimeFailure.classify(0x14, false))
        assertEquals(RuntimeFailure.INVALID_PROGRAM, RuntimeFailure.classify(0x23, false))
        assertEquals(RuntimeFailure.CONTEXT_FULL, RuntimeFailure.classify(0x12, true))
        assertEquals(RuntimeFailure.OTHER, RuntimeFailure.classify(0x01, true))
    }
}
