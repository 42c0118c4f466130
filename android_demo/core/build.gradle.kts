import org.jetbrains.kotlin.gradle.dsl.JvmTarget

// Plain Kotlin/JVM: no Android classes, so the same code compiles with Debian's kotlinc 1.3 in `make test`
// (tests/apps/test_android_core.py) and with the Kotlin Gradle plugin here.
plugins {
    alias(libs.plugins.kotlin.jvm)
}

java {
    sourceCompatibility = JavaVersion.VERSION_17
    targetCompatibility = JavaVersion.VERSION_17
}

kotlin {
    compilerOptions { jvmTarget.set(JvmTarget.JVM_17) }
}

dependencies {
    compileOnly(libs.android.json)  // org.json: built into Android, so not packaged into the app
    testImplementation(libs.junit)
    testImplementation(libs.android.json)
}

// The JUnit tests read bundles and renderings the Python side prepares (`make test` does it all); to run them here:
//   ./gradlew :core:test -Ppocketllm.fixtures=/path/to/fixtures.json
tasks.test {
    val fixtures = providers.gradleProperty("pocketllm.fixtures")
    onlyIf("needs -Ppocketllm.fixtures (written by tests/apps in `make test`)") { fixtures.isPresent }
    if (fixtures.isPresent) systemProperty("pocketllm.fixtures", fixtures.get())
}
