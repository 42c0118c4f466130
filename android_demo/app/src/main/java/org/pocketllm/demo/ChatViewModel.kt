package org.pocketllm.demo

import android.app.ActivityManager
import android.app.Application
import android.content.Context
import android.os.SystemClock
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.isActive
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext
import org.pocketllm.core.Bundle
import org.pocketllm.core.BundleDiscovery
import org.pocketllm.core.BundleEntry
import org.pocketllm.core.BundleProblem
import org.pocketllm.core.BundleVerifier
import org.pocketllm.core.ChatFormatter
import org.pocketllm.core.ChatSession
import org.pocketllm.core.GenerationSettings
import org.pocketllm.core.GenerationStats
import org.pocketllm.core.KernelCheck
import org.pocketllm.core.MemoryEstimate
import org.pocketllm.core.Role
import org.pocketllm.core.RuntimeFailure
import org.pocketllm.core.RuntimeKernels
import org.pocketllm.core.SpecialTokens
import org.pocketllm.core.StopTextFilter
import org.pocketllm.core.TokenBudget
import org.pocketllm.core.VerifyProgress
import org.pocketllm.demo.engine.EngineException
import org.pocketllm.demo.engine.ExecutorchEngine
import org.pocketllm.demo.engine.GenerationListener
import org.pocketllm.demo.engine.LlmEngine
import java.io.File
import java.io.IOException
import java.util.concurrent.Executors

/** Which screen is up. The chat itself lives in ChatUi (it changes with every token). */
sealed class Screen {
    object Scanning : Screen()
    data class Bundles(val entries: List<BundleEntry>, val roots: List<File>, val unreadable: List<File>) : Screen()
    data class Verifying(val bundleName: String, val progress: VerifyProgress?) : Screen()
    data class MemoryWarning(val bundleName: String, val needBytes: Long, val availableBytes: Long,
                             val totalBytes: Long) : Screen()
    data class Loading(val bundleName: String) : Screen()
    object Chat : Screen()
    data class Problem(val title: String, val message: String, val detail: String? = null,
                       val canRetry: Boolean = false) : Screen()
}

enum class Phase { PREFILL, DECODE }

data class UiMessage(
    val id: Long,
    val role: Role,
    val text: String,
    val streaming: Boolean = false,
    val stats: GenerationStats? = null,
    val note: String? = null,
)

data class ChatUi(
    val bundleName: String = "",
    val summary: String = "",
    val messages: List<UiMessage> = emptyList(),
    val generating: Boolean = false,
    val phase: Phase? = null,
    val lastStats: GenerationStats? = null,
    val contextUsed: Long = 0,
    val maxContext: Int = 0,
    val notice: String? = null,
    val templateAvailable: Boolean = true,
    val systemPromptSupported: Boolean = true,
    val topPSupported: Boolean = false,
    val loadMs: Long = 0,
)

/**
 * The app's state machine: scan -> (kernel check, sha256 verification, memory check) -> load -> chat.
 * Every call into the runtime but stop() runs on one dedicated thread (LlmModule is not thread-safe); token
 * callbacks arrive there and are published through StateFlows.
 */
class ChatViewModel(app: Application) : AndroidViewModel(app) {
    private val settingsStore = SettingsStore(app)
    val runtime: RuntimeKernels = RuntimeInfo.kernels(app)

    private val _screen = MutableStateFlow<Screen>(Screen.Scanning)
    val screen: StateFlow<Screen> = _screen.asStateFlow()
    private val _chat = MutableStateFlow(ChatUi())
    val chat: StateFlow<ChatUi> = _chat.asStateFlow()
    private val _settings = MutableStateFlow(settingsStore.load())
    val settings: StateFlow<GenerationSettings> = _settings.asStateFlow()

    private val engineThread = Executors.newSingleThreadExecutor { r -> Thread(r, "pocketllm-engine") }
    private val engineDispatcher = engineThread.asCoroutineDispatcher()

    private var engine: LlmEngine? = null
    private var session: ChatSession? = null
    private var stopTexts: List<String> = emptyList()
    private var lastEntry: BundleEntry? = null
    private var pendingLoad: Bundle? = null
    private var openJob: Job? = null
    private var generateJob: Job? = null
    private var nextId = 0L

    @Volatile
    private var stopRequested = false

    init {
        scan()
    }

    // ---- bundles ------------------------------------------------------------------------------------------

    fun scan() {
        _screen.value = Screen.Scanning
        viewModelScope.launch {
            val roots = RuntimeInfo.bundleRoots(getApplication<Application>())
            val result = withContext(Dispatchers.IO) { BundleDiscovery.scan(roots) }
            _screen.value = Screen.Bundles(result.entries, roots, result.unreadableRoots)
        }
    }

    fun open(entry: BundleEntry) {
        lastEntry = entry
        val problem = entry.problem
        if (problem != null) {
            showProblem(problem)
            return
        }
        val b = entry.bundle ?: return
        openJob?.cancel()
        openJob = viewModelScope.launch {
            try {
                b.requireExecutorch()
                KernelCheck.require(b, runtime)  // before hashing gigabytes: the answer does not depend on them
                _screen.value = Screen.Verifying(b.name, null)
                withContext(Dispatchers.IO) {
                    var shownAt = 0L
                    BundleVerifier().verify(b, progress = { p ->
                        val now = SystemClock.elapsedRealtime()
                        if (now - shownAt >= 50 || p.bytesDone == p.bytesTotal) {  // ~20 updates a second
                            shownAt = now
                            // only while this bundle's check is on screen (Cancel may already have left it)
                            _screen.update { cur ->
                                if (cur is Screen.Verifying && cur.bundleName == b.name) Screen.Verifying(b.name, p) else cur
                            }
                        }
                    }, isCancelled = { !isActive })
                }
            } catch (p: BundleProblem) {
                showProblem(p)
                return@launch
            } catch (e: IOException) {
                _screen.value = Screen.Problem("Unreadable bundle", "${b.dir.path}: ${e.message}", canRetry = true)
                return@launch
            }
            val need = MemoryEstimate.bytes(b)
            val memory = memoryInfo()
            if (need > memory.availMem) {
                pendingLoad = b
                _screen.value = Screen.MemoryWarning(b.name, need, memory.availMem, memory.totalMem)
                return@launch
            }
            load(b)
        }
    }

    /** Verification or the memory warning screen: back to the list. */
    fun cancelOpen() {
        openJob?.cancel()
        pendingLoad = null
        scan()
    }

    fun loadAnyway() {
        val b = pendingLoad ?: return
        pendingLoad = null
        openJob = viewModelScope.launch { load(b) }
    }

    fun retry() {
        val entry = lastEntry
        if (entry == null) scan() else open(entry)
    }

    private suspend fun load(b: Bundle) {
        _screen.value = Screen.Loading(b.name)
        val started = SystemClock.elapsedRealtime()
        val loaded = try {
            withContext(engineDispatcher) {
                val e = ExecutorchEngine(b)
                try {
                    e.load()
                } catch (t: Throwable) {
                    runCatching { e.close() }
                    throw t
                }
                e
            }
        } catch (e: EngineException) {
            val kind = RuntimeFailure.classify(e.code, duringGenerate = false)
            _screen.value = Screen.Problem(kind.title, kind.advice, e.message, canRetry = true)
            return
        } catch (e: OutOfMemoryError) {
            val kind = RuntimeFailure.OUT_OF_MEMORY
            _screen.value = Screen.Problem(kind.title, kind.advice, e.message, canRetry = true)
            return
        } catch (e: UnsatisfiedLinkError) {
            _screen.value = Screen.Problem("Runtime missing",
                "ExecuTorch's native library is not in this build for this device's CPU (the custom AAR is " +
                    "arm64-v8a only)", e.message)
            return
        }
        val texts = withContext(Dispatchers.IO) { stopTextsOf(b) }
        engine = loaded
        session = ChatSession(b.manifest.chat)
        stopTexts = texts
        val m = b.manifest
        _chat.value = ChatUi(
            bundleName = b.name,
            summary = "${m.architecture} · ${m.quantization.scheme} · ${m.model.maxContext} tokens",
            maxContext = m.model.maxContext,
            templateAvailable = m.chat != null,
            systemPromptSupported = m.chat?.supportsSystem == true,
            topPSupported = loaded.supportsTopP,
            loadMs = SystemClock.elapsedRealtime() - started,
        )
        _screen.value = Screen.Chat
    }

    /** Texts that end a reply: the stop/EOS tokens' texts (tokenizer.json) and the assistant turn's end. */
    private fun stopTextsOf(b: Bundle): List<String> {
        val chat = b.manifest.chat
        val ids = ((chat?.stopIds ?: emptyList()) + b.manifest.tokenizer.eosIds).distinct()
        val tokenTexts = SpecialTokens.texts(b, ids)
        return if (chat != null) ChatFormatter(chat).stopTexts(tokenTexts) else tokenTexts.filter { it.isNotEmpty() }
    }

    fun closeBundle() {
        val eng = engine
        engine = null
        session = null
        viewModelScope.launch {
            if (eng != null) {
                stopRequested = true
                eng.stop()
                generateJob?.join()
                withContext(engineDispatcher) { runCatching { eng.close() } }
            }
            _chat.value = ChatUi()
            scan()
        }
    }

    // ---- chat ---------------------------------------------------------------------------------------------

    fun send(text: String) {
        val eng = engine ?: return
        val s = session ?: return
        val userText = text.trim()
        if (userText.isEmpty() || _chat.value.generating) return
        val settings = _settings.value.clamped(_chat.value.maxContext)
        val useTemplate = settings.useChatTemplate && s.canUseTemplate
        val plan = s.plan(userText, settings.systemPrompt, useTemplate)
        val userId = ++nextId
        val replyId = ++nextId
        _chat.update {
            it.copy(messages = it.messages + UiMessage(userId, Role.USER, userText) +
                UiMessage(replyId, Role.ASSISTANT, "", streaming = true),
                generating = true, phase = Phase.PREFILL, notice = null)
        }
        stopRequested = false
        generateJob = viewModelScope.launch {
            val filter = StopTextFilter(stopTexts)
            val budget = TokenBudget(settings.maxNewTokens)
            val reply = StringBuilder()
            var turnStats: GenerationStats? = null
            var budgetHit = false
            val listener = object : GenerationListener {
                override fun onPiece(text: String) {
                    if (stopRequested) {  // a stop pressed during prefill takes effect at the first token
                        eng.stop()
                        return
                    }
                    val shown = filter.push(text)
                    if (shown.isNotEmpty()) {
                        reply.append(shown)
                        val now = reply.toString()
                        _chat.update { ui ->
                            ui.copy(phase = Phase.DECODE,
                                messages = ui.messages.map { m -> if (m.id == replyId) m.copy(text = now) else m })
                        }
                    }
                    if (filter.stopped) {
                        eng.stop()  // end of turn; usually the EOS token, where the runner stops by itself
                    } else if (budget.onPiece()) {
                        budgetHit = true
                        eng.stop()
                    }
                }

                override fun onStats(stats: GenerationStats) {
                    turnStats = stats
                }
            }
            var failure: EngineException? = null
            try {
                withContext(engineDispatcher) {
                    if (plan.resetContext) eng.resetContext()
                    eng.generate(plan.prompt, settings, listener)
                }
            } catch (e: EngineException) {
                failure = e
            }
            if (!filter.stopped) reply.append(filter.finish())
            val finalReply = reply.toString()
            val endedAtStop = failure == null && filter.stopped && !stopRequested && !budgetHit
            s.commit(plan, userText, finalReply, endedAtStop, settings.systemPrompt, useTemplate)
            finishTurn(replyId, finalReply, turnStats, plan.resetContext, failure, budgetHit, settings.maxNewTokens)
        }
    }

    private fun finishTurn(replyId: Long, reply: String, stats: GenerationStats?, reset: Boolean,
                           failure: EngineException?, budgetHit: Boolean, maxNewTokens: Int) {
        val kind = failure?.let { RuntimeFailure.classify(it.code, duringGenerate = true) }
        val note = when {
            kind != null -> kind.title
            stopRequested -> "stopped"
            budgetHit -> "max new tokens ($maxNewTokens) reached"
            else -> null
        }
        val used = stats?.let { it.promptTokens + it.generatedTokens } ?: 0L
        _chat.update { ui ->
            ui.copy(
                messages = ui.messages.map { m ->
                    if (m.id == replyId) m.copy(text = reply, streaming = false, stats = stats, note = note) else m
                },
                generating = false,
                phase = null,
                lastStats = stats ?: ui.lastStats,
                contextUsed = if (reset) used else ui.contextUsed + used,
                notice = if (kind != null) "${kind.title}: ${kind.advice} (${failure?.message})" else null,
            )
        }
        if (kind == RuntimeFailure.OUT_OF_MEMORY) {
            _screen.value = Screen.Problem(kind.title, kind.advice, failure?.message, canRetry = true)
        }
    }

    fun stop() {
        stopRequested = true
        engine?.stop()
    }

    fun newChat() {
        if (_chat.value.generating) return
        session?.clear()  // the next turn resets the runtime's context
        _chat.update { it.copy(messages = emptyList(), lastStats = null, contextUsed = 0, notice = null) }
    }

    fun updateSettings(new: GenerationSettings) {
        _settings.value = new
        settingsStore.save(new)
    }

    private fun showProblem(p: BundleProblem) {
        _screen.value = Screen.Problem(p.title, p.message)
    }

    private fun memoryInfo(): ActivityManager.MemoryInfo {
        val am = getApplication<Application>().getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager
        val info = ActivityManager.MemoryInfo()
        am.getMemoryInfo(info)
        return info
    }

    override fun onCleared() {
        val eng = engine
        engine = null
        eng?.stop()
        engineThread.execute { runCatching { eng?.close() } }  // after any generate() still draining
        engineThread.shutdown()
    }
}
